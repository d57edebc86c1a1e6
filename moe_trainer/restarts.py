"""Training through lost processes: rebuild the engine from the last checkpoint, maybe smaller.

A lost actor (its process killed) is replaced by a group of the same layout. A lost node
takes its CPUs and GPUs with it: the group is rebuilt at the configured layout when the
cluster still holds it (another node took the load, or an autoscaler replaced the node
within ``cluster.wait_for_resources_s``), else with ``fault_tolerance.elastic`` at the
largest valid layout that fits what is left (:mod:`moe_trainer.parallel.elastic`), else
the run stops with its checkpoints intact and says how to resume. Every restart first tries
the configured layout, so a run that shrank grows back at its next restart once the
resources are back (or when it is resumed).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from moe_trainer.config.schema import Config
from moe_trainer.driver import run_training
from moe_trainer.engine import Engine, EngineLost
from moe_trainer.outputs import RunOutputs
from moe_trainer.parallel.elastic import layout
from moe_trainer.preemption import Preemption
from moe_trainer.train.checkpoint import list_checkpoints
from moe_trainer.train.resume import ResumePoint


def train_with_restarts(cfg: Config, engine: Engine, outputs: RunOutputs, make_engine: Callable[[Config], Engine],
                        resume: ResumePoint | None = None, preemption: Preemption | None = None
                        ) -> tuple[dict[str, Any], Engine]:
    """Trains; when a process or node is lost, rebuilds the engine from the last checkpoint (``fault_tolerance``).

    The last checkpoint is this run's newest, else the one the run resumed from. Returns the
    summary and the engine that finished (the caller closes it). An engine built here that an
    error ends is closed here (keeping the Ray connection, which the caller's engine owns).
    """
    restarts, current = 0, cfg
    try:
        while True:
            outputs.write_processes(engine.info())
            try:
                summary = run_training(current, engine, outputs, preemption)
                summary["restarts"] = restarts
                return summary, engine
            except EngineLost as err:
                noticed = time.time()
                if restarts >= cfg.fault_tolerance.max_restarts:
                    raise
                restarts += 1
                t0 = time.perf_counter()
                failed_at = engine.step
                engine.close(keep_cluster=True)
                latest = list_checkpoints(outputs.run_dir / "checkpoints") or ([resume.checkpoint] if resume else [])
                chosen = cfg
                if cfg.parallel.strategy != "single":  # a cluster that may have shrunk
                    from actors.restart import restart_layout

                    chosen = restart_layout(cfg, err, outputs.run_dir, latest[-1] if latest else None)
                engine = make_engine(chosen)
                if latest:
                    engine.load(latest[-1])
                event = {"step": engine.step, "restart": restarts, "reason": str(err), "failed_at_step": failed_at,
                         "steps_lost": failed_at - engine.step, "resumed_from": str(latest[-1]) if latest else None,
                         "noticed_at": noticed, "restart_time_s": time.perf_counter() - t0,
                         "lost_nodes": sorted(getattr(err, "nodes", ())),
                         "old_layout": layout(current), "new_layout": layout(chosen)}
                outputs.log(event)
                changed = "" if layout(chosen) == layout(current) else f", layout {layout(current)} -> {layout(chosen)}"
                print(f"moe-train: restart {restarts}/{cfg.fault_tolerance.max_restarts} after step {failed_at}: "
                      f"{err}; resumed at step {engine.step}{changed}", file=sys.stderr, flush=True)
                current = chosen
    except BaseException:
        if restarts:  # the engine of a restart; the caller closes its own (already closed) first one
            engine.close(keep_cluster=True)
        raise
