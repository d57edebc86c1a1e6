"""Checks ``moe-train``'s command line before Hydra runs, so every mistake in it is one line.

Hydra reports a bad override from inside ``hydra.main`` as several lines (a hint such as
``+moe.num_expert=4`` that trains with the default, or a parser's token error) and exits
with 1. Here the same overrides go through Hydra's own parser and composer first, and each
failure becomes an :class:`~moe_trainer.config.errors.OverrideError` that quotes the override
and says what to write instead; ``moe_trainer.cli.main`` prints it and exits with 2. What
passes is then handed to ``hydra.main`` unchanged, which composes it again (about 0.4 s).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from moe_trainer.config.errors import OverrideError, first_line
from moe_trainer.config.keys import HYDRA_KEY, check_known_keys, did_you_mean, is_list_setting, setting_types


def check_command_line(argv: list[str], conf_dir: str, config_name: str = "config") -> None:
    """Raises :class:`OverrideError` for the first override of `argv` that Hydra would refuse or misread.

    Flags that print something (``--help``, ``--info``, ...) and runs with another config
    directory (``--config-dir``, ``--config-path``) are left to Hydra as they are.
    """
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun:
        return
    if args.config_dir is not None or args.config_path is not None:
        return
    overrides = [_parse(line) for line in args.overrides]
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name="moe-train"):
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None
        groups = set(hydra.config_loader.list_groups(""))
        for override in overrides:
            _check_override(override, groups, hydra)
        for job in _jobs(overrides, multirun=bool(args.multirun)):
            cfg = _compose(hydra, args.config_name or config_name, job, overrides)
            check_known_keys(cfg)


def _parse(line: str) -> Override:
    """Parses one override with Hydra's grammar; a parse error names the override and the usual fix."""
    try:
        return OverridesParser.create().parse_override(line)
    except HydraException as err:
        key = line.split("=", 1)[0].lstrip("+~")
        value = line.split("=", 1)[1] if "=" in line else ""
        fix = f"quote values with special characters: '{key}=\"{value}\"'"
        if "=" not in line:
            fix = f"an override is KEY=VALUE, as in {key}=VALUE"
        elif value.startswith("["):
            items = ",".join(f'"{v.strip()}"' for v in value.strip("[]").split(",") if v.strip())
            fix = f"quote list items with special characters: '{key}=[{items}]'"
        problem = f"cannot be parsed ({str(err).strip().splitlines()[-1]}); {fix}"
        raise OverrideError(line, key, problem) from err


def _values(override: Override) -> list[Any]:
    """Returns the value(s) an override sets: one, or each value of a discrete sweep."""
    if override.is_sweep_override():
        if not override.is_discrete_sweep():
            return []  # interval(...): only a sweeper plugin knows its values
        parser = OverridesParser.create()
        key = override.get_key_element()
        return [parser.parse_override(f"{key}={v}").value() for v in override.sweep_string_iterator()]
    return [override.value()]


def _check_override(override: Override, groups: set[str], hydra: Any) -> None:
    """Refuses an unknown setting, an unknown group option, or a single value where a list belongs."""
    key, line = override.key_or_group, override.input_line or override.key_or_group
    if override.package is not None or key.split(".")[0].split("/")[0] == HYDRA_KEY:
        return  # Hydra's own settings and package moves: Hydra checks them
    if key in groups:
        options = hydra.config_loader.get_group_options(key)
        for value in _values(override):
            if value is not None and str(value) not in options:
                close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)  # the value alone:
                hint = f"; did you mean {key}={close[0]}?" if close else ""  # a shared "key=" would match all
                raise OverrideError(line, key, f"no such option of {key}; choose one of {', '.join(options)}" + hint)
        return
    if override.type == OverrideType.DEL:
        return
    if key not in setting_types():
        raise OverrideError(line, key, "no such setting" + did_you_mean(key, setting_types()))
    if override.type == OverrideType.ADD:  # Hydra: "Could not append to config", with no fix
        raise OverrideError(line, key, f"{key} is a setting already: drop the +, as in {line.lstrip('+')}")
    if is_list_setting(key) and any(v is not None and not isinstance(v, list) for v in _values(override)):
        fix = f"{key}=[{line.split('=', 1)[1]}]"
        raise OverrideError(line, key, f"{key} is a list: write {fix} (quoted in a shell: '{fix}')")


def _jobs(overrides: list[Override], multirun: bool) -> Iterator[list[str]]:
    """Yields the override lists to compose: the run itself, or for a sweep each swept value once.

    A sweep's values are tried one at a time next to the fixed overrides (not every
    combination): key and type errors belong to one value, and the combinations are what the
    jobs themselves validate.
    """
    fixed = [o.input_line or "" for o in overrides if not o.is_sweep_override()]
    swept = [o for o in overrides if o.is_sweep_override()]
    if not multirun or not swept:
        yield [o.input_line or "" for o in overrides]
        return
    yield fixed
    for override in swept:
        if override.is_discrete_sweep():
            key = override.get_key_element()
            for value in override.sweep_string_iterator():
                yield [*fixed, f"{key}={value}"]


def _compose(hydra: Any, config_name: str, job: list[str], overrides: list[Override]) -> Any:
    """Composes one job as ``hydra.main`` would; a failure becomes an :class:`OverrideError`."""
    try:
        return hydra.compose_config(config_name, job, run_mode=RunMode.RUN)
    except MissingConfigException as err:
        options = ", ".join(err.options or [])
        missing = (err.missing_cfg_file or "").replace("/", "=", 1)
        raise OverrideError(missing or " ".join(job), missing.split("=")[0],
                            f"no such option; choose one of {options}" if options else first_line(err)) from err
    except ConfigCompositionException as err:
        cause = err.__cause__
        key = getattr(cause, "full_key", None) if isinstance(cause, OmegaConfBaseException) else None
        line = next((o.input_line for o in overrides if o.key_or_group == key), None) or next(
            (o.input_line for o in overrides if f"'{o.key_or_group}'" in str(err)), None)
        if line is None and "Ambiguous value for argument" in str(err):
            line = str(err).split("'")[1]
            key, value = line.split("=", 1)
            if key in hydra.config_loader.list_groups(""):  # a group takes one option per job: only -m fits
                raise OverrideError(line, key, "a comma makes a sweep: add -m to run one job per option") from err
            raise OverrideError(line, key, f"a comma makes a sweep: add -m to sweep, write '{key}=[{value}]' "
                                f"for a list or '{key}=\"{value}\"' for one string") from err
        raise OverrideError(line or " ".join(job), key or "", first_line(cause or err)) from err
    except (HydraException, ValueError) as err:  # e.g. a group set to null: Hydra raises a bare ValueError
        raise OverrideError(" ".join(job), "", first_line(err)) from err
