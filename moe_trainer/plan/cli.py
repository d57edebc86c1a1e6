"""``moe-plan`` and ``moe-train ... --plan``: print the memory plan of the composed config and exit.

The command line is checked as ``moe-train`` checks it, the config composed as it composes it
(:func:`moe_trainer.cli.compose_config`) and validated, but no run directory is made, no Ray
started and no model allocated. Exit code 0 when the plan fits the budget, 2 when it does not
(with the fixes) or a setting is wrong.
"""

from __future__ import annotations

import sys

from moe_trainer.config.errors import ConfigError, OverrideError

PLAN_FLAG = "--plan"


def plan_command(argv: list[str]) -> int:
    """Prints the plan for the overrides in ``argv``; returns the exit code."""
    from hydra._internal.utils import get_args_parser

    from moe_trainer.cli import CONF_DIR, compose_config
    from moe_trainer.config.command_line import check_command_line
    from moe_trainer.config.schema import to_dataclass
    from moe_trainer.config.validate import validate_settings
    from moe_trainer.launch_gate import exit_invalid
    from moe_trainer.plan.budget import budget, check_budget_setting, check_fits
    from moe_trainer.plan.memory_plan import build_plan
    from moe_trainer.plan.report import format_plan

    args = get_args_parser().parse_args(argv)
    try:
        if args.multirun:
            raise OverrideError("-m", "", "the plan is of one job: drop -m and plan each swept value on its own")
        check_command_line(argv, CONF_DIR)
        cfg = to_dataclass(compose_config(args.overrides))
        validate_settings(cfg)
        check_budget_setting(cfg)
    except ConfigError as err:
        exit_invalid(err)
    plan = build_plan(cfg)
    print(format_plan(cfg, plan, budget(cfg)), flush=True)
    try:
        check_fits(cfg, plan)
    except ConfigError as err:
        fixes = "; ".join(", ".join(f"{k}={v}" for k, v in fix.items()) for fix in err.fixes)
        print(f"moe-train: does not fit; {'try ' + fixes if fixes else 'no single change tried fits'}",
              file=sys.stderr, flush=True)
        return 2
    return 0


def main() -> None:
    """``moe-plan [overrides]``: the same overrides as ``moe-train``."""
    sys.exit(plan_command([a for a in sys.argv[1:] if a != PLAN_FLAG]))


if __name__ == "__main__":
    main()
