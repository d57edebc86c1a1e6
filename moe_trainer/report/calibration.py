"""Fits the cost model's :class:`~moe_trainer.report.cost_model.Machine` to this machine, from the step
timelines of real runs (``RUN_DIR/timelines/step_*.json`` with ``config.yaml`` beside it).

Why timelines and not typed constants: each region says what ran, on which rank, for how long,
and transfers carry their rows, so the per-unit costs come out of the runs whose step time the
model is then asked to predict, in the same process layout and under the same load.

What is fitted, and how (every fit is exact on data that follows the model, which the tests
check with a synthetic timeline):

* **compute per token and per expert row** (forward and backward separately): least squares
  of ``seconds = a * tokens + b * rows`` over three kinds of observation: a coordinator's
  ``forward``/``backward`` region less the transfers and syncs nested in it (tokens only); an
  expert actor's ``experts forward``/``experts backward`` spans (rows only); an
  expert-parallel rank's region less its nested transfers and syncs (its tokens and the rows
  its experts computed: routed rows less those sent away plus those received). ``a`` and
  ``b`` become FLOP/s through the shape's FLOPs per token and per row.
* **link latency and bandwidth**: from the spans of blocking exchanges only (an
  expert-parallel all-to-all moves rows both ways; a disaggregated span is one-way: the
  post of a send, which returns before the rows move, or a receive, which is mostly
  waiting). Those still include waiting for a skewed peer, so a straight fit would charge
  waiting to the wire: the fit is a line through the lower envelope (spans sorted by bytes,
  cut into bins, the fastest of each bin kept, least squares on those). Bytes = the larger
  of rows sent and received, times the row size. When the spans cannot pin a line (none, as
  in disaggregated-only runs; or sizes within a factor 4, as in one expert-parallel layout,
  whose all-to-alls all move about tokens x k / P rows; or a slope that is not positive)
  the fit uses ``reference_transfers`` instead: ``benchmarks/comm.py``'s raw
  ``all_to_all_single`` timings of 1 to 32 MB.
* **optimizer seconds per parameter**: least squares through zero of the ``optimizer`` spans
  against the parameters the rank updates.
* **step overhead**: the recorded step time less the span of the rank's timed regions (data
  batch, zero_grad, lr schedule: what no region covers), averaged.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moe_trainer.report.cost_model import Link, Machine, Shape

BYTE_VOCAB = 257  # the byte tokenizer's vocabulary (256 bytes and an end-of-text token)
FIRST_STEP = 3  # sampled steps before this one still pay warm-up (allocation, lazy init)
ONE_HOST = 1 << 20  # devices per node of this machine: every rank shares one host


@dataclass(frozen=True)
class RunInfo:
    """What a run's ``config.yaml`` says about its layout and shape."""

    strategy: str
    ranks: int  # expert_parallel: P; disaggregated: coordinators + expert actors
    coordinators: int
    expert_actors: int
    micro_batches: int
    shape: Shape

    def tokens_per_rank(self) -> float:
        """Tokens a coordinator or an expert-parallel rank runs attention for, per step."""
        return self.shape.tokens_per_step / (self.coordinators if self.strategy == "disaggregated" else self.ranks)

    def params(self, role: str) -> int:
        s = self.shape
        if role == "experts":
            return s.num_experts // self.expert_actors * s.expert_params()
        if role == "coordinator":
            return s.dense_params()
        return s.dense_params() + s.num_experts // self.ranks * s.expert_params()


def read_run_info(run_dir: Path) -> RunInfo:
    """The run's layout and shape; the vocabulary of a non-byte run is read from its ``tokenizer.json``."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    vocab = None
    if cfg["data"].get("tokenizer", "byte") != "byte":
        from moe_trainer.data.tokenizer_file import TOKENIZER_FILE, FileTokenizer

        file = run_dir / TOKENIZER_FILE
        if not file.is_file():
            raise ValueError(f"{run_dir}: data.tokenizer={cfg['data']['tokenizer']} but the run has no "
                             f"{TOKENIZER_FILE}, so its vocabulary (the embedding and LM head) is unknown")
        vocab = FileTokenizer.from_file(file).vocab_size
    return run_info(cfg, str(run_dir), vocab)


def run_info(cfg: dict[str, Any], where: str = "config", vocab: int | None = None) -> RunInfo:
    """The layout and shape a resolved config (``config.yaml`` as the driver writes it) describes.

    ``vocab``: the run's vocabulary; needed unless the run used the byte tokenizer (whose
    vocabulary the config alone fixes), since it sizes the embedding and LM head.
    """
    model, moe, par, train, data = cfg["model"], cfg["moe"], cfg["parallel"], cfg["train"], cfg["data"]
    if vocab is None:
        if data.get("tokenizer", "byte") != "byte":
            raise ValueError(f"{where}: data.tokenizer={data['tokenizer']}: the vocabulary comes from the run's "
                             "tokenizer.json (read_run_info reads it), not from the config")
        vocab = BYTE_VOCAB
    payload = 2 if train.get("precision") == "bf16" else 4
    shape = Shape(d_model=model["d_model"], n_layers=model["n_layers"], n_heads=model["n_heads"],
                  seq_len=data["seq_len"], vocab=vocab, num_experts=moe["num_experts"], top_k=moe["top_k"],
                  expert_hidden=moe["expert_hidden"], tokens_per_step=train["batch_size"] * data["seq_len"],
                  moe_every=moe["every"],
                  first_dense=moe.get("first_dense", 0), ffn_hidden=model["ffn_hidden"], payload_bytes=payload)
    strategy = par["strategy"]
    if strategy == "disaggregated":
        c, x = par["num_coordinators"], par["num_expert_actors"]
        return RunInfo(strategy, c + x, c, x, par["micro_batches"], shape)
    if strategy != "expert_parallel":
        raise ValueError(f"{where}: strategy {strategy} is not modelled (expert_parallel, disaggregated)")
    if par.get("ep_size") not in (None, par["num_actors"]) or par.get("micro_batches", 1) != 1:
        raise ValueError(f"{where}: expert_parallel is modelled with ep_size = num_actors and micro_batches=1")
    return RunInfo(strategy, par["num_actors"], 0, 0, 1, shape)


@dataclass
class Observations:
    """Everything the fits use, pooled over runs and sampled steps."""

    compute: dict[str, list[tuple[float, float, float]]] = field(
        default_factory=lambda: {"fwd": [], "bwd": []})  # (tokens, rows, seconds)
    transfers: list[tuple[float, float]] = field(default_factory=list)  # (bytes, seconds)
    optimizer: list[tuple[float, float]] = field(default_factory=list)  # (parameters, seconds)
    overhead: list[float] = field(default_factory=list)  # seconds per step outside the regions
    imbalance: list[float] = field(default_factory=list)  # expert_parallel: busiest rank's rows / mean, per step


def _role(events: list[dict[str, Any]], pid: int) -> str:
    for e in events:
        if e.get("ph") == "M" and e["name"] == "process_name" and e["pid"] == pid:
            return str(e["args"]["name"]).split("·")[-1].strip()
    return "trainer"


def _nested(outer: dict[str, Any], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    end = outer["ts"] + outer["dur"]
    return [e for e in events if e is not outer and e["pid"] == outer["pid"] and e["cat"] in ("transfer", "sync")
            and outer["ts"] <= e["ts"] and e["ts"] + e["dur"] <= end + 1e-3]


def add_trace(obs: Observations, info: RunInfo, trace: dict[str, Any], step_time_s: dict[int, float]) -> None:
    """Adds one step's trace (all ranks) to the observations; ``step_time_s``: the recorded step time per rank."""
    events = trace["traceEvents"]
    timed = [e for e in events if e.get("ph") == "X"]
    s = info.shape
    rows_routed = info.tokens_per_rank() * s.top_k * s.moe_layers  # rows a rank routes per pass, all layers
    ep_rows: list[list[float]] = []
    for pid in sorted({e["pid"] for e in timed}):
        mine = [e for e in timed if e["pid"] == pid]
        role = _role(events, pid)
        for e in mine:
            if e["cat"] == "transfer":
                a = e["args"]
                # only blocking exchanges (rows both ways) time the wire: a one-way span is either the post of a
                # send (returns before the rows move) or a receive (mostly waiting for the peer's compute)
                if a.get("rows_sent", 0) and a.get("rows_recv", 0):
                    obs.transfers.append((max(a["rows_sent"], a["rows_recv"]) * s.row_bytes, e["dur"] / 1e6))
            elif e["name"] == "optimizer":
                obs.optimizer.append((info.params(role), e["dur"] / 1e6))
            elif role == "experts" and e["name"] in ("experts forward", "experts backward"):
                obs.compute["fwd" if e["name"].endswith("forward") else "bwd"].append(
                    (0.0, e["args"]["rows"], e["dur"] / 1e6))
        if role != "experts":
            rows = 0.0
            if info.strategy == "expert_parallel":
                # the data all-to-alls of the forward, one per MoE layer (the count exchanges move no rows)
                moved = [(a["rows_sent"], a["rows_recv"]) for a in (e["args"] for e in mine if e["name"] == "dispatch")
                         if a["rows_sent"] or a["rows_recv"]]
                per_layer = [rows_routed / s.moe_layers - sent + recv for sent, recv in moved]
                rows = sum(per_layer)
                ep_rows.append(per_layer)
            for e in mine:
                if e["name"] in ("forward", "backward"):
                    inner = sum(n["dur"] for n in _nested(e, mine))
                    obs.compute["fwd" if e["name"] == "forward" else "bwd"].append(
                        (info.tokens_per_rank(), rows, (e["dur"] - inner) / 1e6))
        if pid in step_time_s and role != "experts":
            extent = max(e["ts"] + e["dur"] for e in mine) - min(e["ts"] for e in mine)
            obs.overhead.append(max(0.0, step_time_s[pid] - extent / 1e6))
    if ep_rows and len({len(r) for r in ep_rows}) == 1:
        # all-to-alls hold every rank to the busiest one layer by layer: the sum of per-layer maxima counts
        layers = list(zip(*ep_rows, strict=True))
        obs.imbalance.append(sum(max(rows) for rows in layers) / sum(statistics.fmean(rows) for rows in layers))


def step_times(run_dir: Path) -> dict[int, dict[int, float]]:
    """Recorded step time per step and rank (coordinators/trainers), from ``metrics.jsonl``."""
    out: dict[int, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "step_time_s_per_rank" in rec:
            out[rec["step"]] = dict(enumerate(rec["step_time_s_per_rank"]))
    return out


def measured_step_s(run_dir: Path, skip: int = FIRST_STEP) -> float:
    """Median of the slowest rank's step time over the steps after ``skip``: the number to predict.

    The median, not the mean: on a shared box another process's burst slows a few steps by
    half or more, which a mean of a dozen steps would carry into the check.
    """
    values = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s_max"] for r in values if "step_time_s_max" in r and r["step"] > skip]
    if not times:
        raise ValueError(f"{run_dir}: no step times after step {skip} (train.log_every=1 records every step)")
    return statistics.median(times)


def observe(run_dirs: list[Path], first_step: int = FIRST_STEP) -> tuple[Observations, dict[Path, RunInfo]]:
    obs, infos = Observations(), {}
    for run_dir in run_dirs:
        info = infos[run_dir] = read_run_info(run_dir)
        times = step_times(run_dir)
        for path in sorted((run_dir / "timelines").glob("step_*.json")):
            trace = json.loads(path.read_text())
            step = int(trace["metadata"]["step"])
            if step >= first_step:
                add_trace(obs, info, trace, times.get(step, {}))
    return obs, infos


def fit_compute(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Seconds per token and per expert row: least squares of ``seconds = a tokens + b rows``."""
    a = np.array([(t, r) for t, r, _ in points], dtype=float)
    y = np.array([s for *_, s in points], dtype=float)
    if np.linalg.matrix_rank(a) < 2:
        raise ValueError("compute fit needs both dense (tokens) and expert (rows) observations: "
                         "calibrate from a disaggregated run, or from two layouts")
    (per_token, per_row), *_ = np.linalg.lstsq(a, y, rcond=None)
    return float(per_token), float(per_row)


def fit_lower_envelope(points: list[tuple[float, float]], bins: int = 6) -> tuple[float, float]:
    """Latency (s) and seconds per byte of the line through the fastest point of each bytes bin."""
    pts = sorted(points)
    size = max(1, len(pts) // bins)
    chosen = [min(pts[i:i + size], key=lambda p: p[1]) for i in range(0, len(pts), size)]
    x = np.array([p[0] for p in chosen], dtype=float)
    y = np.array([p[1] for p in chosen], dtype=float)
    if np.ptp(x) == 0:
        raise ValueError("transfer fit needs spans of more than one size")
    slope, intercept = np.polyfit(x, y, 1)
    return max(0.0, float(intercept)), float(slope)


MIN_SIZE_RANGE = 4.0  # largest / smallest transfer: below this, latency and bandwidth cannot be told apart


def fit_link(spans: list[tuple[float, float]], reference: list[tuple[float, float]]) -> tuple[float, float, str]:
    """Latency, seconds per byte and where they came from: the runs' all-to-all spans when their sizes
    span a factor :data:`MIN_SIZE_RANGE` and give a positive slope, else the reference measurement.

    An expert-parallel run's all-to-alls all move about the same rows (tokens x k / P, give or
    take the routing), so on their own they pin one point of the line, not its slope.
    """
    sizes = [b for b, _ in spans if b > 0]
    if sizes and max(sizes) >= MIN_SIZE_RANGE * min(sizes):
        latency, slope = fit_lower_envelope(spans)
        if slope > 0:
            return latency, slope, f"lower envelope of {len(spans)} all-to-all spans"
    if not reference:
        raise ValueError(f"{len(spans)} all-to-all spans cannot fit the link (sizes within a factor "
                         f"{MIN_SIZE_RANGE:g}, or none): add runs of other sizes or pass reference_transfers")
    latency, slope = fit_lower_envelope(reference)
    return latency, slope, f"benchmarks/comm.py raw all_to_all_single ({len(reference)} sizes)"


def fit_through_zero(points: list[tuple[float, float]]) -> float:
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    return float(x @ y / (x @ x))


@dataclass(frozen=True)
class Calibration:
    """The fitted machine, and the raw per-unit numbers it came from (for the docs' table)."""

    machine: Machine
    parameters: list[dict[str, Any]]  # {"name", "value", "unit", "fit"}
    imbalance: float  # expert_parallel runs: busiest rank's expert rows over the mean (1.0 without such runs)


def calibrate(run_dirs: list[Path], first_step: int = FIRST_STEP,
              reference_transfers: list[tuple[float, float]] | None = None) -> Calibration:
    """The :class:`Machine` of this host, fitted to the timelines of ``run_dirs`` (same model shape).

    ``reference_transfers``: (bytes, seconds) of blocking exchanges measured elsewhere, for the
    link fit when the runs have too few of their own (fewer than two sizes).
    """
    obs, infos = observe(run_dirs, first_step)
    latency, s_per_byte, link_source = fit_link(obs.transfers, reference_transfers or [])
    shapes = {replace_tokens(i.shape) for i in infos.values()}
    if len(shapes) != 1:
        raise ValueError("calibration runs must share one model shape (batch aside)")
    shape = next(iter(shapes))
    tok_f, row_f = fit_compute(obs.compute["fwd"])
    tok_b, row_b = fit_compute(obs.compute["bwd"])
    opt = fit_through_zero(obs.optimizer)
    overhead = statistics.fmean(obs.overhead) if obs.overhead else 0.0
    link = Link(1 / s_per_byte, latency)
    machine = Machine("this host (fitted)", dense_fwd=shape.dense_flops() / tok_f,
                      dense_bwd=2 * shape.dense_flops() / tok_b, expert_fwd=shape.expert_flops() / row_f,
                      expert_bwd=2 * shape.expert_flops() / row_b, optimizer_s_per_param=opt, intra=link,
                      inter=link, devices_per_node=ONE_HOST, step_overhead_s=overhead)
    n_c = {k: len(v) for k, v in obs.compute.items()}
    params = [
        {"name": "dense forward", "value": tok_f * 1e6, "unit": "us/token",
         "fit": f"least squares over {n_c['fwd']} forward regions and expert spans", "flop_s": machine.dense_fwd},
        {"name": "dense backward", "value": tok_b * 1e6, "unit": "us/token", "fit": "same, backward",
         "flop_s": machine.dense_bwd},
        {"name": "expert forward", "value": row_f * 1e6, "unit": "us/row", "fit": "same fit, rows term",
         "flop_s": machine.expert_fwd},
        {"name": "expert backward", "value": row_b * 1e6, "unit": "us/row", "fit": "same fit, rows term",
         "flop_s": machine.expert_bwd},
        {"name": "link latency", "value": latency * 1e6, "unit": "us",
         "fit": link_source},
        {"name": "link bandwidth", "value": link.bandwidth / 1e9, "unit": "GB/s", "fit": "same line's slope"},
        {"name": "optimizer", "value": opt * 1e9, "unit": "ns/param",
         "fit": f"least squares through 0 of {len(obs.optimizer)} optimizer spans"},
        {"name": "step overhead", "value": overhead * 1e3, "unit": "ms",
         "fit": f"mean of {len(obs.overhead)} (step time - timed extent)"},
    ]
    imbalance = statistics.fmean(obs.imbalance) if obs.imbalance else 1.0
    return Calibration(machine, params, imbalance)


def replace_tokens(shape: Shape) -> Shape:
    """The shape with the batch left out: runs of one model with different batches calibrate together."""
    return replace(shape, tokens_per_step=0)
