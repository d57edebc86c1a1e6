"""Peak memory per process with ``train.recompute=none | attention | block``, and what dominates it.

    python -m benchmarks.memory [--steps 20] [--seq-len 1024] [--layouts single "expert_parallel x2"]
                                [--allocator retained|unmapped] [--no-breakdown]

The pre-2026-12-04 default model (``benchmarks.common.OLD_DEFAULT``: d_model 128, 4 layers,
8 experts top-2, batch 16) at ``data.seq_len``
(``model.max_seq_len`` raised to match). Two parts:

1. what one forward keeps for backward, by part of the model, per mode
   (:func:`moe_trainer.model.memory.kept_activations`, one forward on ``single``);
2. per layout, the three modes side by side: ``single`` as three spawned processes,
   ``expert_parallel`` as three 2-actor groups, stepped in turn (one step each, round
   after round), so the step-time ratios see the same load from the rest of the machine
   (4 agents share 2 cores here: absolute times are not comparable across runs, ratios
   measured interleaved are). Peak RSS is each process's high-water mark
   (``VmHWM``), read after the last step; the loss curves must be the same.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
from collections.abc import Callable
from typing import Any

import ray
import torch
import torch.nn.functional as F

from benchmarks.common import OLD_DEFAULT, config, loadavg, print_table, write_json
from moe_trainer.config.validate import validate

MODES = ("none", "attention", "block")


# ``--allocator unmapped``: glibc serves every block over 128 KiB with its own mmap and unmaps it on
# free, so resident memory follows the live tensors; the default (``train.retain_freed_memory``)
# keeps freed blocks in the heap, whose high-water mark adds the heap's fragmentation
UNMAPPED_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def overrides(seq_len: int, mode: str, extra: list[str], allocator: str = "retained") -> list[str]:
    retain = ["train.retain_freed_memory=false"] if allocator == "unmapped" else []
    return [*OLD_DEFAULT, f"data.seq_len={seq_len}", f"model.max_seq_len={seq_len}", f"train.recompute={mode}",
            "logger.mode=disabled", "logger.progress=false", "train.checkpoint_every=0", *retain, *extra]


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark, MiB.

    ``VmHWM`` belongs to the process's own address space; ``getrusage``'s ``ru_maxrss`` survives
    ``exec``, so a spawned child would report its parent's size at fork when that was larger.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def breakdown(seq_len: int) -> list[dict[str, Any]]:
    """MiB each part of the model keeps from the forward for the backward, per mode (``single``)."""
    from moe_trainer.engine import build_model
    from moe_trainer.model.memory import kept_activations

    rows = []
    for mode in MODES:
        cfg, _ = config(overrides(seq_len, mode, []))
        torch.manual_seed(0)
        model = build_model(cfg, 257)
        idx = torch.randint(0, 257, (cfg.train.batch_size, seq_len))

        def forward(model: Any = model, idx: torch.Tensor = idx) -> torch.Tensor:
            return F.cross_entropy(model(idx).logits_BSV.flatten(0, 1), idx.flatten())

        loss, kept = kept_activations(model, forward)
        parts: dict[str, int] = {}
        for name, nbytes in kept.by_module.items():
            names = name.split(".")
            part = names[2] if names[0] == "blocks" and len(names) > 2 else "rest (embed, residual, dispatch, head)"
            if part == "ffn" and len(names) > 3:
                part = names[3]
            part = {"ffn": "rest (embed, residual, dispatch, head)", "qkv": "attn", "out": "attn"}.get(part, part)
            parts[part] = parts.get(part, 0) + nbytes
        del loss
        tokens_layers = idx.numel() * cfg.model.n_layers
        for part, nbytes in sorted(parts.items(), key=lambda kv: -kv[1]):
            rows.append({"mode": mode, "part": part, "kept_mib": nbytes / 2**20,
                         "floats_per_token_layer": nbytes / 4 / tokens_layers})
        rows.append({"mode": mode, "part": "TOTAL", "kept_mib": kept.total / 2**20,
                     "floats_per_token_layer": kept.total / 4 / tokens_layers})
    return rows


# ----- single: one spawned process per mode, stepped over a pipe -----
def _single_worker(conn: Any, cfg_overrides: list[str]) -> None:
    from moe_trainer.engine import LocalEngine

    torch.set_num_threads(1)
    cfg, _ = config(cfg_overrides)
    validate(cfg)
    engine = LocalEngine(cfg)
    while conn.recv() == "step":
        conn.send(engine.train(1)[0])
    conn.send({"peak_rss_mb": [peak_rss_mb()]})


class SingleRun:
    def __init__(self, cfg_overrides: list[str]) -> None:
        self.conn, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=_single_worker, args=(child, cfg_overrides), daemon=True)
        self.proc.start()

    def step(self) -> dict[str, Any]:
        self.conn.send("step")
        record: dict[str, Any] = self.conn.recv()
        return record

    def finish(self) -> list[float]:
        self.conn.send("stop")
        peaks: list[float] = self.conn.recv()["peak_rss_mb"]
        self.proc.join(timeout=60)
        return peaks


# ----- Ray layouts: one actor group per mode, all alive, stepped in turn -----
def _actor_peak_rss(actor: Any) -> float:
    return peak_rss_mb()


class RayRun:
    def __init__(self, cfg_overrides: list[str]) -> None:
        from actors.engine import RayEngine

        cfg, _ = config(cfg_overrides)
        validate(cfg)
        self.engine = RayEngine(cfg)

    def step(self) -> dict[str, Any]:
        return self.engine.train(1)[0]

    def finish(self) -> list[float]:
        peaks = ray.get([a.__ray_call__.remote(_actor_peak_rss) for a in self.engine.group.actors])
        self.engine.close(keep_cluster=True)
        return [float(p) for p in peaks]


LAYOUTS: dict[str, tuple[list[str], Callable[[list[str]], Any]]] = {
    "single": (["parallel=single"], SingleRun),
    "expert_parallel x2": (["parallel=expert_parallel", "parallel.num_actors=2", "parallel.cpus_per_actor=1"],
                           RayRun),
}


def side_by_side(layout: str, seq_len: int, steps: int, allocator: str) -> list[dict[str, Any]]:
    extra, runner = LAYOUTS[layout]
    runs = {mode: runner(overrides(seq_len, mode, [*extra, f"train.max_steps={steps}"], allocator)) for mode in MODES}
    records: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for step in range(steps):
        order = MODES if step % 2 == 0 else MODES[::-1]  # neither mode always runs first in a round
        for mode in order:
            records[mode].append(runs[mode].step())
        print(f"{layout}: step {step + 1}/{steps} " + " ".join(
            f"{m}={records[m][-1]['step_time_s_max']:.2f}s" for m in MODES), flush=True)
    peaks = {mode: runs[mode].finish() for mode in MODES}
    ref = records["none"]
    rows = []
    for mode in MODES:
        recs = records[mode]
        ratios = [r["step_time_s_max"] / n["step_time_s_max"] for r, n in zip(recs[1:], ref[1:], strict=True)]
        loss_diff = max(abs(r["loss"] - n["loss"]) / abs(n["loss"]) for r, n in zip(recs, ref, strict=True))
        rows.append({
            "layout": layout, "allocator": allocator, "mode": mode, "peak_rss_mb_max": max(peaks[mode]),
            "peak_rss_mb_per_process": peaks[mode],
            "rss_vs_none": max(peaks[mode]) / max(peaks["none"]),
            "step_time_s_median": statistics.median(r["step_time_s_max"] for r in recs[1:]),
            "step_time_vs_none": statistics.median(ratios),
            "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"],
            "loss_rel_diff_vs_none_max": loss_diff, "losses": [r["loss"] for r in recs],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--out", default="memory", help="name of the JSON result in benchmarks/results/")
    parser.add_argument("--allocator", choices=["retained", "unmapped"], default="retained",
                        help="retained: train.retain_freed_memory (the default); unmapped: see UNMAPPED_ENV")
    args = parser.parse_args()
    load_before = loadavg()
    kept = [] if args.no_breakdown else breakdown(args.seq_len)
    if kept:
        print_table(kept, ["mode", "part", "kept_mib", "floats_per_token_layer"])
    rows = []
    env = UNMAPPED_ENV if args.allocator == "unmapped" else {}
    os.environ.update(env)  # spawned single processes inherit it; Ray actors get it from the job's runtime_env
    if any(runner is RayRun for name, (_, runner) in LAYOUTS.items() if name in args.layouts):
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                 num_cpus=6, runtime_env={"env_vars": env})
    for layout in args.layouts:
        rows += side_by_side(layout, args.seq_len, args.steps, args.allocator)
    if ray.is_initialized():
        ray.shutdown()
    print_table(rows, ["layout", "allocator", "mode", "peak_rss_mb_max", "rss_vs_none", "step_time_s_median",
                       "step_time_vs_none", "loss_last", "loss_rel_diff_vs_none_max"])
    print(write_json(args.out, {"args": vars(args), "loadavg_before": load_before, "loadavg_after": loadavg(),
                                "kept_activations": kept, "rows": rows}))


if __name__ == "__main__":
    main()
