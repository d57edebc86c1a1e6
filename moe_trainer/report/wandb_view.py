"""``moe-report --wandb``: the checks before anything is written, then write the view, then save it.

Order matters: every refusal (a target that is not ``ENTITY/PROJECT``, runs that did not log to
W&B or to that project, a group none of them logged to, saving without a key, a group W&B's
filter cannot hold) comes before the local report is written, so a refused command leaves the
output folder as it was. The view is written to its file before W&B is called, so a failed save
loses nothing; the file is what ``--save-wandb`` saves later.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_trainer.logging.wandb_logger import ENV_MODES, api_key_available, resolve_mode, wandb_run_id
from moe_trainer.report.dashboard import (
    WORKSPACE_FILE,
    build_workspace,
    filter_groups,
    keep_identity,
    load_workspace,
    workspace_json,
)
from moe_trainer.report.load import Run

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # a W&B entity or project name


class UsageError(ValueError):
    """An argument that cannot work, named with its value and what is allowed; raised before anything is written."""


@dataclass(frozen=True)
class ViewPlan:
    """What ``--wandb`` will write and whether it saves: everything checked, nothing written yet."""

    workspace: Any
    group: str
    save: bool
    not_saved_because: str  # why it will not be saved now ("" when it will)


def wandb_target(text: str) -> tuple[str, str]:
    """``ENTITY/PROJECT`` -> ``(entity, project)``."""
    match = re.fullmatch(rf"({_NAME})/({_NAME})", text)
    if match is None:
        raise UsageError(f"--wandb {text!r} is not ENTITY/PROJECT: a W&B entity (user or team) and a project, "
                         "each of letters, digits, '-', '_' or '.', joined by one '/' (e.g. my-team/moe-trainer)")
    return match[1], match[2]


def _first_seen(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def _logger(run: Run, key: str) -> str:
    """The run's ``logger.project`` or ``logger.group`` ("" when absent)."""
    return str(run.setting("logger", key) or "")


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def view_runs(runs: Sequence[Run], project: str, group: str | None) -> tuple[str, list[Run]]:
    """The W&B group the view shows and the runs given that are in it; refuses runs the view could not show.

    Every run given must have logged to W&B project ``project``: one that did not (W&B off, or
    another ``logger.project``) would silently be missing from the view the user asked for. Runs of
    other groups are left out only when ``--group`` chose one.
    """
    off = [r for r in runs if not wandb_run_id(r.path)]
    if off:
        names = ", ".join(str(r.path) for r in off[:3]) + (f" and {len(off) - 3} more" if len(off) > 3 else "")
        raise UsageError(f"{_plural(len(off), 'run')} given did not log to W&B (W&B was off: logger.mode or "
                         f"WANDB_MODE=disabled, or it failed to start), so a W&B view cannot show "
                         f"{'it' if len(off) == 1 else 'them'}: {names}; leave {'it' if len(off) == 1 else 'them'} "
                         "out")
    elsewhere = [r for r in runs if _logger(r, "project") != project]
    if elsewhere:
        projects = ", ".join(_first_seen([_logger(r, "project") for r in elsewhere]))
        raise UsageError(f"--wandb .../{project}: {_plural(len(elsewhere), 'run')} given logged to W&B project "
                         f"{projects} (logger.project), not {project!r}")
    groups = _first_seen([_logger(r, "group") for r in runs])
    if group is not None:
        if group not in groups:
            raise UsageError(f"--group {group!r}: none of the {_plural(len(runs), 'run')} given is in that W&B "
                             f"group (their logger.group: {', '.join(groups) or 'none'})")
        return group, [r for r in runs if _logger(r, "group") == group]
    if len(groups) != 1:
        raise UsageError(f"the runs given logged to {len(groups)} W&B groups ({', '.join(groups) or 'none'}): "
                         "choose the view's group with --group")
    return groups[0], list(runs)


def save_now(mode: str | None) -> tuple[bool, str]:
    """Whether to save in W&B now, and if not, why: as training runs decide (``WANDB_MODE``, then the key)."""
    if mode == "offline":
        return False, "--wandb-mode offline"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = env if env in ENV_MODES else ""  # resolve_mode ignores other values, and so does the reason
    resolved = "online" if mode == "online" else resolve_mode("auto")
    if resolved == "online":
        _require_key("--wandb-mode online" if mode == "online" else f"WANDB_MODE={env}",
                     " (or --wandb-mode offline to only write the view's file)")
        return True, ""
    return False, f"WANDB_MODE={env}" if env else "no W&B API key (WANDB_API_KEY or `wandb login`)"


def _require_key(flag: str, hint: str = "") -> None:
    """Saving needs a W&B API key: without one, say so (naming what asked to save) before calling W&B."""
    if not api_key_available():
        raise UsageError(f"{flag} saves the view in W&B and needs a W&B API key: set WANDB_API_KEY or run "
                         f"`wandb login`{hint}")


def can_save() -> None:
    """``--save-wandb`` always saves."""
    _require_key("--save-wandb")


def plan_view(runs: Sequence[Run], target: str, group: str | None, mode: str | None) -> ViewPlan:
    """Every check of ``--wandb``, and the view built and serialised once (a group W&B cannot filter fails here)."""
    entity, project = wandb_target(target)
    save, why_not = save_now(mode)
    chosen, shown = view_runs(runs, project, group)
    layers = max((run.num_layers for run in shown), default=0)
    try:
        workspace = build_workspace(entity, project, chosen, layers)
        held = filter_groups(workspace)
    except Exception as exc:  # wandb-workspaces parses the filter as an expression: a quote breaks it
        raise UsageError(f"logger.group {chosen!r} cannot be written into a W&B view's run filter "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc
    if held != [chosen]:  # a backslash is read as an escape there: the filter would select another group
        raise UsageError(f"logger.group {chosen!r} cannot be written into a W&B view's run filter (it would "
                         f"read {held[0] if len(held) == 1 else held!r})")
    return ViewPlan(workspace, chosen, save, why_not)


def write_and_save(plan: ViewPlan, out: Path) -> int:
    """Writes the view into ``out`` (keeping the W&B identity of one saved from there before), saves it if online."""
    path = out / WORKSPACE_FILE
    keep_identity(plan.workspace, path)
    path.write_text(workspace_json(plan.workspace))
    ws = plan.workspace
    print(f"W&B view of group {plan.group!r} in {ws.entity}/{ws.project} written to {path}", flush=True)
    if not plan.save:
        print(f"not saved in W&B ({plan.not_saved_because}); save it with: moe-report --save-wandb {path}")
        return 0
    return save(ws, path)


def save(workspace: Any, path: Path) -> int:
    """Saves a view in W&B; a failure keeps the file and says how to retry. Returns the exit code."""
    try:
        workspace.save()  # W&B gives a new view its name and id
    except Exception as exc:  # network, server or permission: the local files stay as they are
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        print(f"moe-report: saving the W&B view failed ({type(exc).__name__}: {reason}); it is kept in {path}; "
              f"save it later with: moe-report --save-wandb {path}", file=sys.stderr)
        return 1
    # its W&B name and id into the file: saving it again updates this view instead of adding one
    path.write_text(workspace_json(workspace))
    try:
        print(f"W&B view saved: {workspace.url}")
    except Exception:  # the URL needs one more API call; the view is saved either way
        print(f"W&B view saved in {workspace.entity}/{workspace.project}: {workspace.name!r}")
    return 0


def load_saved(path: Path) -> Any:
    """A view file written by ``--wandb``, checked before saving (a file that is not one cannot be retried)."""
    try:
        return load_workspace(path)
    except OSError as exc:
        raise UsageError(f"--save-wandb {path}: cannot read it ({exc.strerror or exc}); moe-report --wandb writes "
                         f"OUT/{WORKSPACE_FILE}") from exc
    except Exception as exc:  # JSON or pydantic validation
        raise UsageError(f"--save-wandb {path}: not a view written by moe-report --wandb ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:160]})") from exc
