"""The driver loop shared by every strategy: chunks of steps, evaluation, checkpoints, logging.

It knows nothing about how steps are computed; it asks an :class:`Engine` for
chunks that end at the next log, eval or checkpoint boundary.
"""

from __future__ import annotations

import math
import time
from typing import Any

from tqdm import tqdm

from moe_trainer import STARTED_AT
from moe_trainer.config.schema import Config
from moe_trainer.engine import Engine
from moe_trainer.outputs import RunOutputs
from moe_trainer.train.checkpoint import prune_checkpoints


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


def _next_boundary(step: int, every: int, last: int) -> int:
    return min(last, (step // every + 1) * every) if every > 0 else last


def run_training(cfg: Config, engine: Engine, outputs: RunOutputs) -> dict[str, Any]:
    """Trains to ``train.max_steps`` from wherever ``engine`` stands; returns the run summary."""
    t = cfg.train
    ckpt_root = outputs.run_dir / "checkpoints"
    summary: dict[str, Any] = {"start_step": engine.step, **engine.info()}
    t_start = time.perf_counter()
    if engine.step == 0:
        summary["initial_val_loss"] = engine.evaluate()
        outputs.log({"step": 0, "val_loss": summary["initial_val_loss"]})
    bar = tqdm(total=t.max_steps, initial=engine.step, disable=not cfg.logger.progress, unit="step",
               dynamic_ncols=True)
    tokens_per_s: list[float] = []
    last: dict[str, Any] = {}
    try:
        while engine.step < t.max_steps:
            stop = min(_next_boundary(engine.step, every, t.max_steps)
                       for every in (t.log_every, t.eval_every, t.checkpoint_every))
            chunk_start = time.time()
            records = engine.train(stop - engine.step)
            if "time_to_first_step_s" not in summary:  # from the `moe-train` start (first package import)
                first_done = chunk_start + records[0].get("step_time_s_max", records[0]["step_time_s"])
                summary["time_to_first_step_s"] = first_done - STARTED_AT
            bar.update(len(records))
            for record in records:
                if record.get("step_skipped") or not math.isfinite(record["loss"]):
                    what = f"loss {record['loss']}, gradient norm {record['grad_norm']} at step {record['step']}"
                    if t.on_nan == "stop":
                        raise TrainingDiverged(f"non-finite {what}; stopping (train.on_nan=stop). The update was "
                                               f"not applied and the last good checkpoint in {ckpt_root} is intact.")
                    bar.write(f"warning: non-finite {what}; update skipped (train.on_nan=skip)")
                tokens_per_s.append(record["tokens_per_s"])
                if record["step"] % t.log_every == 0 or record["step"] == t.max_steps:
                    outputs.log(record)
            last = records[-1]
            bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if engine.step % t.eval_every == 0 or engine.step == t.max_steps:
                val = engine.evaluate()
                outputs.log({"step": engine.step, "val_loss": val})
                summary["final_val_loss"] = val
                bar.write(f"step {engine.step}: val_loss {val:.4f}")
            if (t.checkpoint_every and engine.step % t.checkpoint_every == 0) or engine.step == t.max_steps:
                engine.save(ckpt_root)
                prune_checkpoints(ckpt_root, t.keep_last)
            summary["final_loss"] = last["loss"]
    finally:
        bar.close()
    summary["steps"] = engine.step
    summary["train_time_s"] = time.perf_counter() - t_start
    if tokens_per_s:  # steps were run in this call (not a resume at max_steps)
        summary["tokens_per_s_mean"] = sum(tokens_per_s) / len(tokens_per_s)
        summary["mem_rss_mb_per_process"] = last.get("mem_rss_mb_per_rank", [])
        if "expert_mem_rss_mb_per_actor" in last:
            summary["mem_rss_mb_per_expert_actor"] = last["expert_mem_rss_mb_per_actor"]
    return summary
