"""Suggested fixes that are known to work: each is applied to a copy of the config and validated.

A fix that only moves the user to the next error (``parallel.num_actors=3`` suggesting
``moe.num_experts=9``, which ``train.batch_size=16`` then refuses) is worse than none. So a
candidate fix is kept only when the whole config validates with it; one that fails is tried
once more with ``train.batch_size`` moved to the nearest size that splits evenly, the
usual next error, and offered as that combination when it then passes.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from contextvars import ContextVar

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import Config

Fix = dict[str, object]  # settings to change together: {"moe.num_experts": 9, "train.batch_size": 15}

# set while a candidate is validated: errors raised then build no suggestions of their own
_CHECKING: ContextVar[bool] = ContextVar("checking_a_fix", default=False)


def apply(cfg: Config, fix: Fix) -> Config:
    """Returns a copy of `cfg` with the dotted settings of `fix` changed."""
    changed = copy.deepcopy(cfg)
    for key, value in fix.items():
        *path, name = key.split(".")
        setattr(functools.reduce(getattr, path, changed), name, value)
    return changed


def validates(cfg: Config) -> bool:
    """Whether `cfg` passes the whole validation (without building suggestions for its errors)."""
    from moe_trainer.config.validate import validate  # it imports this module

    token = _CHECKING.set(True)
    try:
        validate(cfg)
        return True
    except ConfigError:
        return False
    finally:
        _CHECKING.reset(token)


def batch_unit(cfg: Config) -> int:
    """Sequences ``train.batch_size`` must be a multiple of: ranks x accumulation x micro-batches x group."""
    from moe_trainer.config.validate import data_parallel_ranks, micro_batches

    group = cfg.moe.group_sequences or 1
    return data_parallel_ranks(cfg) * cfg.train.grad_accum_steps * micro_batches(cfg) * group


def nearest_multiples(value: int, unit: int) -> list[int]:
    """The positive multiples of `unit` just below and above `value`, nearest first."""
    below, above = unit * (value // unit), unit * -(-value // unit)
    found = sorted({m for m in (below, above) if m > 0}, key=lambda m: (abs(m - value), m))
    return found or [unit]


def divisors(n: int) -> list[int]:
    """The positive divisors of `n`, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def even_share_fixes(experts: int, setting: str, size: int) -> list[Fix]:
    """Candidates when ``moe.num_experts`` does not split evenly over `size` holders (`setting`):
    the nearest expert counts that do, then the nearest two sizes that divide the experts."""
    nearest = sorted(divisors(experts), key=lambda d: (abs(d - size), d))[:2]
    return [*({"moe.num_experts": m} for m in nearest_multiples(experts, size)), *({setting: d} for d in nearest)]


def passing(cfg: Config, candidates: Iterable[Fix], limit: int = 3) -> list[Fix]:
    """Returns up to `limit` of `candidates` that make `cfg` validate: single changes first, else in order.

    A candidate that fails alone is retried with ``train.batch_size`` at its nearest multiples
    of :func:`batch_unit`. While a candidate is being checked, nested errors suggest nothing.
    """
    if _CHECKING.get():
        return []
    found: list[Fix] = []
    for fix in candidates:
        if fix in found:
            continue
        changed = apply(cfg, fix)
        if validates(changed):
            found.append(fix)
            continue
        if "train.batch_size" in fix:
            continue
        for size in nearest_multiples(cfg.train.batch_size, batch_unit(changed)):
            with_batch = {**fix, "train.batch_size": size}
            if validates(apply(cfg, with_batch)):
                found.append(with_batch)
                break
    return sorted(found, key=len)[:limit]


def describe(fixes: list[Fix]) -> str:
    """``"; try A=1, or B=2 with C=3"``, or ``""`` when there is no fix to offer."""
    if not fixes:
        return ""
    return "; try " + ", or ".join(" with ".join(f"{k}={v}" for k, v in fix.items()) for fix in fixes)


def refusal(cfg: Config, setting: str, value: object, problem: str, candidates: Iterable[Fix]) -> ConfigError:
    """A :class:`ConfigError` whose message ends with those `candidates` that pass (also in ``.fixes``)."""
    fixes = passing(cfg, candidates)
    err = ConfigError(setting, value, problem + describe(fixes))
    err.fixes = fixes
    return err
