"""The step-time cost model: calibrated on this machine's timelines, checked against its runs, projected to
a GPU cluster (moe_trainer/report/cost_model.py, moe_trainer/report/calibration.py).

    .venv/bin/python -m benchmarks.cost_model --make-runs /tmp/cm          # the four runs, one after another
    .venv/bin/python -m benchmarks.cost_model --calibrate /tmp/cm/ep2 /tmp/cm/dis_mb2 \\
        --check /tmp/cm/ep2 /tmp/cm/dis_mb1 /tmp/cm/dis_mb2 /tmp/cm/dis_mb4

``--make-runs DIR`` trains each layout of :data:`RUNS` for ``--steps`` steps with a timeline
every 5 steps and every step logged, into ``DIR/<name>`` (sequentially: they share the CPUs), on
the pre-2026-12-04 default model (``benchmarks.common.OLD_DEFAULT``, what docs/benchmarks.md measured).
``--calibrate`` fits the machine to the named runs' timelines; ``--check`` predicts each named
run's mean step time (steps after the third) and compares. The projection uses the stated
cluster and shapes below, whatever was calibrated: only the model's structure carries over.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import OLD_DEFAULT, RESULTS, loadavg, print_table, write_json
from moe_trainer.report.calibration import Calibration, calibrate, measured_step_s, read_run_info
from moe_trainer.report.cost_model import Link, Machine, Prediction, Shape, disaggregated, expert_parallel, gpu_machine

RUNS = {
    "ep2": ["parallel=expert_parallel", "parallel.num_actors=2"],
    "dis_mb1": ["parallel=disaggregated", "parallel.num_coordinators=1", "parallel.num_expert_actors=1",
                "parallel.micro_batches=1"],
    "dis_mb2": ["parallel=disaggregated", "parallel.num_coordinators=1", "parallel.num_expert_actors=1",
                "parallel.micro_batches=2"],
    "dis_mb4": ["parallel=disaggregated", "parallel.num_coordinators=1", "parallel.num_expert_actors=1",
                "parallel.micro_batches=4"],
}
COMMON = ["logger.timeline_every=5", "train.log_every=1", "train.eval_every=100", "train.checkpoint_every=0",
          "logger.mode=disabled", "logger.progress=false", "parallel.cpus_per_actor=1"]

# The projection's cluster: every number is an assumption, printed with the table.
H100_PEAK_BF16 = 989e12  # FLOP/s, dense (no sparsity), H100 SXM
MFU = 0.40
NVLINK = Link(bandwidth=0.8 * 450e9, latency=10e-6)  # 900 GB/s is both directions: 450 each, 80 % achieved
INFINIBAND = Link(bandwidth=0.8 * 50e9, latency=20e-6)  # 400 Gb/s NDR per GPU = 50 GB/s a direction, 80 % achieved
HBM = 3.35e12  # B/s: AdamW reads and writes ~32 bytes per parameter
TOKENS_PER_GPU = 16384
MIXTRAL = dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, seq_len=4096, vocab=32000, num_experts=8,
               top_k=2, expert_hidden=14336)
# the pre-2026-12-04 default (benchmarks.common.OLD_DEFAULT: d_model 128, experts of 2 x d_model, top-2, every
# block MoE) 8x wider, 4x deeper, with 64 experts: the shape docs/benchmarks.md projects
DEFAULT_SCALED = dict(d_model=1024, n_layers=16, n_heads=16, seq_len=2048, vocab=32000, num_experts=64, top_k=2,
                      expert_hidden=2048)
ASSUMPTIONS = [
    f"H100 SXM, {H100_PEAK_BF16 / 1e12:.0f} TFLOP/s bf16 dense peak at {MFU:.0%} MFU for attention, LM head and "
    "experts alike (forward and backward)",
    f"8 GPUs per node; NVLink {NVLINK.bandwidth / 1e9:.0f} GB/s a direction, {NVLINK.latency * 1e6:.0f} us a "
    f"message; InfiniBand {INFINIBAND.bandwidth / 1e9:.0f} GB/s a direction per GPU, "
    f"{INFINIBAND.latency * 1e6:.0f} us a message",
    f"rows on the wire in bf16; gradients all-reduced in fp32; AdamW 32 B/param at {HBM / 1e12:.2f} TB/s HBM",
    f"{TOKENS_PER_GPU} tokens per GPU per step (global batch grows with the cluster); uniform routing",
    "expert_parallel: ep_size = min(GPUs, experts), micro_batches=1, no overlap; disaggregated: C:X on interleaved "
    "nodes, X divides the experts (no expert replicas)",
    "attention FLOPs counted over the full sequence (no causal halving); memory not modelled: state_gb says "
    "whether weights + AdamW state (16 B/param) fit 80 GB",
]


def make_runs(out: Path, steps: int) -> None:
    moe_train = Path(sys.executable).parent / "moe-train"
    for name, overrides in RUNS.items():
        cmd = [str(moe_train), *OLD_DEFAULT, *overrides, *COMMON, f"train.max_steps={steps}",
               f"hydra.run.dir={out / name}"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def predict_run(run_dir: Path, machine: Machine, imbalance: float) -> Prediction:
    info = read_run_info(run_dir)
    if info.strategy == "expert_parallel":
        return expert_parallel(info.shape, machine, info.ranks, imbalance=imbalance)
    return disaggregated(info.shape, machine, info.coordinators, info.expert_actors, info.micro_batches)


def reference_transfers() -> list[tuple[float, float]]:
    """(bytes, seconds) of one raw ``all_to_all_single`` from benchmarks/comm.py's last result, if any.

    Its rows time a dispatch and a combine (two calls, equal bytes each way) per size: halved here.
    """
    path = RESULTS / "comm.json"
    if not path.exists():
        return []
    rows = json.loads(path.read_text()).get("bandwidth", [])
    return [(r["mb_sent_per_rank"] * 2**20 / 2, r["raw_ms"] / 2e3) for r in rows]


def check(run_dirs: list[Path], calibrated_on: list[Path]) -> tuple[Calibration, list[dict[str, Any]]]:
    """Each run's measured step against two predictions: from the machine fitted to every calibration run,
    and from the machine fitted to the others only (leave one out: the run never saw its own timelines)."""
    reference = reference_transfers()
    cal = calibrate(calibrated_on, reference_transfers=reference)
    rows = []
    for run_dir in run_dirs:
        others = [r for r in calibrated_on if r != run_dir]
        held_out = calibrate(others, reference_transfers=reference) if others != calibrated_on else cal
        p = predict_run(run_dir, cal.machine, cal.imbalance)
        q = predict_run(run_dir, held_out.machine, held_out.imbalance)
        measured = measured_step_s(run_dir)
        rows.append({"run": run_dir.name, "layout": p.layout, "measured_s": measured,
                     "predicted_s": p.step_s, "error_pct": 100 * (p.step_s / measured - 1),
                     "held_out_s": q.step_s, "held_out_error_pct": 100 * (q.step_s / measured - 1),
                     "terms_ms": {k: round(v * 1e3, 2) for k, v in p.terms.items()}})
    return cal, rows


def _busy(p: Prediction) -> float:
    t = p.terms
    if "coordinator_compute" in t:
        return max(t["coordinator_compute"], t["expert_busy"]) + t["optimizer"]
    return t["dense_fwd"] + t["dense_bwd"] + t["experts_fwd"] + t["experts_bwd"] + t["optimizer"]


def projection() -> list[dict[str, Any]]:
    h100 = gpu_machine("H100", H100_PEAK_BF16, MFU, NVLINK, INFINIBAND, 8, HBM)
    rows = []
    for label, dims in (("Mixtral-8x7B-like", MIXTRAL), ("old default x8 wide, 64 experts", DEFAULT_SCALED)):
        for gpus in (8, 32):
            shape = Shape(**dims, tokens_per_step=TOKENS_PER_GPU * gpus, payload_bytes=2)  # type: ignore[arg-type]
            preds = [expert_parallel(shape, h100, gpus)]
            for x in sorted({min(gpus // 2, shape.num_experts), min(gpus // 4, shape.num_experts)}, reverse=True):
                preds += [disaggregated(shape, h100, gpus - x, x, m) for m in (1, 4, 8)]
            best = min(p.step_s for p in preds)
            for p in preds:
                rows.append({"shape": label, "gpus": gpus, "layout": p.layout, "step_ms": p.step_s * 1e3,
                             "Mtok_s": p.tokens_per_s / 1e6, "vs_best": p.step_s / best,
                             "busy_ms": _busy(p) * 1e3, "exposed_ms": (p.step_s - _busy(p)) * 1e3,
                             "state_gb": p.state_gb_per_device})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-runs", type=Path, metavar="DIR", help="train the layouts of RUNS into DIR first")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--calibrate", type=Path, nargs="+", required=True, metavar="RUN_DIR")
    parser.add_argument("--check", type=Path, nargs="*", default=[], metavar="RUN_DIR")
    args = parser.parse_args()
    if args.make_runs:
        make_runs(args.make_runs, args.steps)
    cal, checked = check(args.check, args.calibrate)
    print("calibration (this host):")
    print_table(cal.parameters, ["name", "value", "unit", "flop_s", "fit"])
    print(f"expert_parallel imbalance (busiest rank's expert rows / mean, per layer): {cal.imbalance:.3f}\n")
    if checked:
        print("check against measurement:")
        print_table(checked, ["run", "layout", "measured_s", "predicted_s", "error_pct", "held_out_s",
                              "held_out_error_pct"])
        for row in checked:
            print(f"  {row['layout']}: {row['terms_ms']}")
        print()
    projected = projection()
    print("projection:")
    print_table(projected, ["shape", "gpus", "layout", "step_ms", "Mtok_s", "vs_best", "busy_ms", "exposed_ms",
                            "state_gb"])
    print("assumptions:\n" + "\n".join(f"  - {a}" for a in ASSUMPTIONS))
    print(write_json("cost_model", {"args": {k: str(v) for k, v in vars(args).items()}, "loadavg": loadavg(),
                                    "calibration": cal.parameters, "imbalance": cal.imbalance,
                                    "fitted_machine": repr(cal.machine), "check": checked, "projection": projected,
                                    "assumptions": ASSUMPTIONS}))


if __name__ == "__main__":
    main()
