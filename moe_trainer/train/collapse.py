"""Collapsing experts: one that gets less than a fraction of its fair share of tokens, step after step.

An expert the router stops choosing gets no gradient through its weights and no say in the
loss; left alone it stays dead (the "expert collapse" of Shazeer et al. 2017 that load
balancing exists to prevent). :class:`CollapseWatch` reads every step's per-layer loads
(``record["layers"][i]["tokens_per_expert"]``, the global batch's) and reports an expert once
it has been under ``share`` of the mean load for ``steps`` steps in a row, naming its MoE layer,
block and expert, and again when it recovers. The driver prints the report and logs it
(``metrics.jsonl`` and a W&B alert).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExpertReport:
    """An expert that started collapsing (``recovered`` False) or recovered at ``step``."""

    step: int
    layer: int  # MoE layer, in depth order
    block: int  # its transformer block
    expert: int  # global expert index
    share: float  # its load over the layer's mean load at this step
    since_step: int  # first step of the run below the threshold
    recovered: bool = False

    def line(self, threshold: float, steps: int) -> str:
        where = f"expert {self.expert} of MoE layer {self.layer} (block {self.block})"
        if self.recovered:
            return f"expert recovered: {where} is back at {self.share:.0%} of its fair share at step {self.step}"
        return (f"expert collapsing: {where} got under {threshold:.0%} of its fair share of tokens for {steps} steps "
                f"in a row (since step {self.since_step}; {self.share:.1%} at step {self.step})")

    def record(self) -> dict[str, Any]:
        return {"step": self.step, "event": "expert_recovered" if self.recovered else "expert_collapsing",
                "moe_layer": self.layer, "block": self.block, "expert": self.expert, "expert_share": self.share,
                "below_since_step": self.since_step}


class CollapseWatch:
    """Counts, per (layer, expert), the steps in a row under ``share`` of the fair share; ``steps`` 0 disables."""

    def __init__(self, share: float, steps: int, blocks: list[int]) -> None:
        self.share, self.steps, self.blocks = share, steps, blocks  # blocks: block index of each MoE layer
        self._below_since: dict[tuple[int, int], int] = {}
        self._reported: set[tuple[int, int]] = set()

    def observe(self, record: dict[str, Any]) -> list[ExpertReport]:
        """The reports this step's loads make (usually none)."""
        if not self.steps:
            return []
        step, out = int(record["step"]), []
        for layer, stats in enumerate(record.get("layers") or []):
            load = stats["tokens_per_expert"]
            mean = sum(load) / len(load)
            if mean <= 0:
                continue
            for expert, tokens in enumerate(load):
                key, share = (layer, expert), tokens / mean
                if share < self.share:
                    since = self._below_since.setdefault(key, step)
                    if step - since + 1 >= self.steps and key not in self._reported:
                        self._reported.add(key)
                        out.append(ExpertReport(step, layer, self._block(layer), expert, share, since))
                else:
                    self._below_since.pop(key, None)
                    if key in self._reported:
                        self._reported.discard(key)
                        out.append(ExpertReport(step, layer, self._block(layer), expert, share, step, True))
        return out

    def _block(self, layer: int) -> int:
        return self.blocks[layer] if layer < len(self.blocks) else -1
