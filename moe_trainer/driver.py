"""The driver loop shared by every strategy: chunks of steps, evaluation, checkpoints, logging.

It knows nothing about how steps are computed; it asks an :class:`Engine` for
chunks that end at the next log, eval or checkpoint boundary (or earlier, at a
non-finite step that ends training: see :mod:`moe_trainer.train.nan_guard`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moe_trainer import STARTED_AT
from moe_trainer.config.schema import Config
from moe_trainer.engine import Engine
from moe_trainer.model.transformer import is_moe_block
from moe_trainer.outputs import RunOutputs
from moe_trainer.preemption import Preempted, Preemption
from moe_trainer.startup import phase
from moe_trainer.train.aggregate import TIMELINE_KEY
from moe_trainer.train.checkpoint import checkpoint_dir, list_checkpoints, prune_checkpoints
from moe_trainer.train.collapse import CollapseWatch, ExpertReport
from moe_trainer.train.nan_guard import SkipPolicy


class TrainingDiverged(RuntimeError):
    """The loss, gradient or weights became NaN or infinite; the last good checkpoint is left untouched."""


def _next_boundary(step: int, every: int, last: int) -> int:
    return min(last, (step // every + 1) * every) if every > 0 else last


def _last_checkpoint(ckpt_root: Path) -> str:
    found = list_checkpoints(ckpt_root)
    return f"the last finite checkpoint is {found[-1]}" if found else f"no checkpoint was saved in {ckpt_root}"


def _non_finite(record: dict[str, Any]) -> str:
    return f"non-finite loss {record['loss']}, gradient norm {record['grad_norm']} at step {record['step']}"


def _diverged(record: dict[str, Any], policy: SkipPolicy, ckpt_root: Path) -> TrainingDiverged:
    what = _non_finite(record)
    if policy.on_nan == "stop":
        return TrainingDiverged(f"{what}; stopping (train.on_nan=stop). The update was not applied and "
                                f"{_last_checkpoint(ckpt_root)}, intact.")
    return TrainingDiverged(f"{what}: {policy.consecutive} steps in a row were skipped "
                            f"(train.max_skipped_steps={policy.max_skipped}); stopping, the model has probably "
                            f"gone non-finite. {_last_checkpoint(ckpt_root)}; resume from it with a lower train.lr, "
                            "or raise train.max_skipped_steps if the bad batches are transient.")


def _save(engine: Engine, ckpt_root: Path, keep_last: int, background: bool) -> None:
    """Saves and prunes, unless the state went non-finite: that one is never written (and nothing pruned).

    ``background`` (``train.async_checkpoint``): the previous background save is completed first (one in
    flight at most), then this one starts and training goes on while its files are written.
    """
    _finish_background_save(engine, ckpt_root, keep_last)
    bad = engine.nonfinite_state()
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise TrainingDiverged(f"the model state at step {engine.step} holds NaN/inf ({', '.join(bad[:3])}{more}); "
                               f"it was not saved and no checkpoint was pruned: {_last_checkpoint(ckpt_root)}.")
    if background:
        engine.save_in_background(ckpt_root)
        return
    engine.save(ckpt_root)
    prune_checkpoints(ckpt_root, keep_last)


def _finish_background_save(engine: Engine, ckpt_root: Path, keep_last: int) -> None:
    """Completes the background save in flight (its state was finite when it started), then prunes."""
    if engine.finish_save() is not None:
        prune_checkpoints(ckpt_root, keep_last)


def _preempt(engine: Engine, ckpt_root: Path, keep_last: int, outputs: RunOutputs,
             preemption: Preemption) -> Preempted:
    """SIGTERM came: a checkpoint of the step every rank stopped after (unless one is already saved), then out."""
    t0 = time.perf_counter()
    _finish_background_save(engine, ckpt_root, keep_last)
    path = checkpoint_dir(ckpt_root, engine.step)
    if path not in list_checkpoints(ckpt_root):  # the step may just have been saved (a checkpoint boundary)
        _save(engine, ckpt_root, keep_last, background=False)
    save_time = time.perf_counter() - t0
    outputs.log({"step": engine.step, "preempted": "SIGTERM", "preempt_save_time_s": save_time,
                 "preempt_exit_s": preemption.elapsed_s()})
    return Preempted(engine.step, str(path), save_time, preemption.elapsed_s())


def collapse_watch(cfg: Config) -> CollapseWatch:
    """The collapse report of ``logger.collapse_share``/``collapse_steps`` over this model's MoE layers."""
    blocks = [] if cfg.model.arch == "dense" else [i for i in range(cfg.model.n_layers) if is_moe_block(i, cfg.moe)]
    return CollapseWatch(cfg.logger.collapse_share, cfg.logger.collapse_steps, blocks)


def _report_collapse(report: ExpertReport, cfg: Config, outputs: RunOutputs, write: Callable[[str], None]) -> None:
    line = report.line(cfg.logger.collapse_share, cfg.logger.collapse_steps)
    write(f"warning: {line}" if not report.recovered else line)
    outputs.log(report.record())
    if not report.recovered:
        outputs.wandb.alert(f"expert {report.expert} of MoE layer {report.layer} collapsing", line)


def run_training(cfg: Config, engine: Engine, outputs: RunOutputs,
                 preemption: Preemption | None = None) -> dict[str, Any]:
    """Trains to ``train.max_steps`` from wherever ``engine`` stands; returns the run summary.

    ``initial_val_loss`` is this start's first evaluation, made where the engine stands: step 0,
    or the step a resume continues from, so the closing line compares two real evaluations.
    ``preemption``: after its SIGTERM the engine stops after its current step, a checkpoint is
    saved there and :class:`Preempted` is raised.
    """
    preemption = preemption or Preemption(cfg.fault_tolerance.preempt_timeout_s)
    preemption.listen(engine.request_stop)
    t = cfg.train
    ckpt_root = outputs.run_dir / "checkpoints"
    summary: dict[str, Any] = {"start_step": engine.step, **engine.info()}
    t_start = time.perf_counter()
    if outputs.first_val_loss is None:  # at step 0, or at the step a resume starts from: a real evaluation
        outputs.log({"step": engine.step, "val_loss": engine.evaluate()})
    summary["initial_val_loss"] = outputs.first_val_loss  # after a restart: the first attempt's
    policy = SkipPolicy.from_config(t)  # decides like the engine's, from the same records
    bar = tqdm(total=t.max_steps, initial=engine.step, disable=not cfg.logger.progress, unit="step",
               dynamic_ncols=True)
    tokens_per_s: list[float] = []
    last: dict[str, Any] = {}
    collapse = collapse_watch(cfg)
    try:
        while engine.step < t.max_steps:
            if preemption.requested.is_set():
                raise _preempt(engine, ckpt_root, t.keep_last, outputs, preemption)
            stop = min(_next_boundary(engine.step, every, t.max_steps)
                       for every in (t.log_every, t.eval_every, t.checkpoint_every))
            if "time_to_first_step_s" not in summary:  # the first step alone, so its line comes when it ends
                stop = engine.step + 1
            chunk_start = time.time()
            asked = stop - engine.step
            records = engine.train(asked)
            if "time_to_first_step_s" not in summary:  # from the `moe-train` start (first package import)
                first_done = chunk_start + records[0].get("step_time_s_max", records[0]["step_time_s"])
                summary["time_to_first_step_s"] = first_done - STARTED_AT
                phase(f"first step done, {summary['time_to_first_step_s']:.1f} s after start")
            bar.update(len(records))
            for i, record in enumerate(records):
                events = record.pop(TIMELINE_KEY, None)  # a sampled step's trace: its own file, whether logged or not
                if events:
                    outputs.write_timeline(int(record["step"]), events)
                # the engine's own policy (which may have counted skips before this call) is authoritative:
                # a chunk that ended early ended at a step that stops training
                cut_short = i == len(records) - 1 and len(records) < asked
                skipped_too_often = policy.must_stop(record)
                if cut_short and not skipped_too_often and preemption.requested.is_set():
                    outputs.log(record)  # the ranks agreed to stop after this step: its record is the last
                    raise _preempt(engine, ckpt_root, t.keep_last, outputs, preemption)
                ends = skipped_too_often or cut_short
                if ends or record["step"] % t.log_every == 0 or record["step"] == t.max_steps:
                    outputs.log(record)
                if ends:  # the engine ended the chunk right after this step, on every rank
                    _finish_background_save(engine, ckpt_root, t.keep_last)  # a finite state: the last good one
                    raise _diverged(record, policy, ckpt_root)
                for report in collapse.observe(record):
                    _report_collapse(report, cfg, outputs, bar.write)
                if record.get("step_skipped"):
                    bar.write(f"warning: {_non_finite(record)}; update skipped (train.on_nan=skip, "
                              f"{policy.consecutive} in a row, at most train.max_skipped_steps={policy.max_skipped})")
                tokens_per_s.append(record["tokens_per_s"])
            last = records[-1]
            bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if engine.step % t.eval_every == 0 or engine.step == t.max_steps:
                val = engine.evaluate()
                outputs.log({"step": engine.step, "val_loss": val})
                summary["final_val_loss"] = val
                bar.write(f"step {engine.step}: val_loss {val:.4f}")
            if (t.checkpoint_every and engine.step % t.checkpoint_every == 0) or engine.step == t.max_steps:
                _save(engine, ckpt_root, t.keep_last, t.async_checkpoint)
            summary["final_loss"] = last["loss"]
        _finish_background_save(engine, ckpt_root, t.keep_last)
    finally:
        bar.close()
    summary["steps"] = engine.step
    summary["train_time_s"] = time.perf_counter() - t_start
    if tokens_per_s:  # steps were run in this call (not a resume at max_steps)
        summary["tokens_per_s_mean"] = sum(tokens_per_s) / len(tokens_per_s)
        summary["mem_rss_mb_per_process"] = last.get("mem_rss_mb_per_rank", [])
        summary["mem_peak_rss_mb_per_process"] = last.get("mem_peak_rss_mb_per_rank", [])
        summary["mem_optim_state_mb_per_process"] = last.get("mem_optim_state_mb_per_rank", [])
        if "expert_mem_rss_mb_per_actor" in last:
            summary["mem_rss_mb_per_expert_actor"] = last["expert_mem_rss_mb_per_actor"]
            summary["mem_peak_rss_mb_per_expert_actor"] = last["expert_mem_peak_rss_mb_per_actor"]
    return summary
