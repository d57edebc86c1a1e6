"""Calibration recovers the parameters a synthetic timeline was made with (no Ray, no training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from moe_trainer.report.calibration import calibrate, measured_step_s, read_run_info, run_info
from moe_trainer.report.cost_model import disaggregated, expert_parallel
from moe_trainer.timeline import chrome_trace

TRUE = {"tok_f": 30e-6, "row_f": 4e-6, "tok_b": 50e-6, "row_b": 7e-6, "latency": 20e-6, "s_per_byte": 1 / 1.5e9,
        "opt": 1.5e-9, "overhead": 0.7e-3}
ROW_BYTES = 128 * 4


def config(strategy: str, **parallel: Any) -> dict[str, Any]:
    return {"model": {"d_model": 128, "n_layers": 4, "n_heads": 4, "ffn_hidden": 512},
            "moe": {"num_experts": 8, "top_k": 2, "every": 1, "expert_hidden": 256},
            "parallel": {"strategy": strategy, "ep_size": None, "micro_batches": 1, **parallel},
            "train": {"batch_size": 16, "precision": "fp32"}, "data": {"tokenizer": "byte", "seq_len": 128}}


def transfer(phase: str, sent: int, recv: int) -> tuple[str, float, dict[str, int]]:
    return phase, TRUE["latency"] + max(sent, recv) * ROW_BYTES * TRUE["s_per_byte"], {"rows_sent": sent,
                                                                                        "rows_recv": recv}


class Rank:
    """Lays one rank's regions end to end (a compute region encloses the transfers run inside it)."""

    def __init__(self, pid: int, role: str) -> None:
        self.pid, self.role, self.t, self.events = pid, role, 0.0, [
            {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": f"rank {pid} · {role}"}}]

    def add(self, name: str, cat: str, seconds: float, args: dict[str, Any] | None = None,
            start: float | None = None) -> None:
        ts = self.t if start is None else start
        self.events.append({"name": name, "cat": cat, "ph": "X", "ts": 1e15 + ts * 1e6, "dur": seconds * 1e6,
                            "pid": self.pid, "tid": 0, "args": args or {}})
        if start is None:
            self.t += seconds

    def region(self, name: str, compute: float, transfers: list[tuple[str, float, dict[str, int]]]) -> None:
        """``name`` lasting its compute plus its transfers, the transfers nested inside it."""
        start, t = self.t, self.t + compute / 2
        for phase, seconds, args in transfers:
            self.add(phase, "transfer", seconds, args, start=t)
            t += seconds
        self.add(name, "compute", compute + sum(s for _, s, _ in transfers), {"pass": 0}, start=start)
        self.t = start + compute + sum(s for _, s, _ in transfers)


def write_run(path: Path, cfg: dict[str, Any], ranks: list[Rank], steps: list[int]) -> Path:
    (path / "timelines").mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    step_times = [r.t + TRUE["overhead"] for r in ranks if r.role != "experts"]
    events = [e for r in ranks for e in r.events]
    records = []
    for step in range(1, max(steps) + 1):
        records.append({"step": step, "step_time_s_max": max(step_times), "step_time_s_per_rank": step_times})
        if step in steps:
            trace = chrome_trace(events, {"step": step})
            (path / "timelines" / f"step_{step:06d}.json").write_text(json.dumps(trace))
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def disaggregated_run(path: Path) -> Path:
    """1 coordinator + 1 expert actor, 2 micro-batches of 1024 tokens (2048 rows) per MoE layer."""
    coord, experts = Rank(0, "coordinator"), Rank(1, "experts")
    cfg = config("disaggregated", num_coordinators=1, num_expert_actors=1, micro_batches=2)
    info = run_info(cfg)
    rows = 2048
    coord.region("forward", 2048 * TRUE["tok_f"], [transfer("dispatch", rows, 0), transfer("combine", 0, rows)] * 8)
    coord.region("backward", 2048 * TRUE["tok_b"],
                 [transfer("combine_bwd", rows, 0), transfer("dispatch_bwd", 0, rows)] * 8)
    for name, per_row in (("experts forward", TRUE["row_f"]), ("experts backward", TRUE["row_b"])):
        for _ in range(8):
            experts.add("wait for rows", "wait", 1e-3, {"rows": rows})
            experts.add(name, "compute", rows * per_row, {"rows": rows})
    coord.add("optimizer", "optimizer", info.params("coordinator") * TRUE["opt"])
    experts.add("optimizer", "optimizer", info.params("experts") * TRUE["opt"])
    return write_run(path / "dis", cfg, [coord, experts], [2, 5, 10])


def expert_parallel_run(path: Path) -> Path:
    """2 ranks of 1024 tokens; per MoE layer each sends some of its 2048 rows and receives the peer's."""
    # rank 0's (sent, received) per layer: transfer sizes a factor 6 apart, enough to pin the link's line
    moved = [(200, 1800), (1500, 500), (1000, 1000), (300, 300)]
    info = run_info(config("expert_parallel", num_actors=2))
    ranks = []
    for pid in (0, 1):
        rank = Rank(pid, "trainer")
        mine = [(s, r) if pid == 0 else (r, s) for s, r in moved]
        computed = sum(2048 - s + r for s, r in mine)
        fwd = [t for s, r in mine for t in (("dispatch", TRUE["latency"], {"rows_sent": 0, "rows_recv": 0}),
                                            transfer("dispatch", s, r), transfer("combine", r, s))]
        bwd = [t for s, r in reversed(mine) for t in (transfer("combine_bwd", r, s), transfer("dispatch_bwd", s, r))]
        rank.region("forward", 1024 * TRUE["tok_f"] + computed * TRUE["row_f"], fwd)
        rank.region("backward", 1024 * TRUE["tok_b"] + computed * TRUE["row_b"], bwd)
        rank.add("grad sync", "sync", 1e-3)
        rank.add("optimizer", "optimizer", info.params("trainer") * TRUE["opt"])
        ranks.append(rank)
    return write_run(path / "ep", config("expert_parallel", num_actors=2), ranks, [2, 5, 10])


def test_fits_the_parameters_a_timeline_was_made_with(tmp_path: Path) -> None:
    runs = [disaggregated_run(tmp_path), expert_parallel_run(tmp_path)]
    cal = calibrate(runs)
    got = {p["name"]: p["value"] for p in cal.parameters}
    assert got["dense forward"] == pytest.approx(TRUE["tok_f"] * 1e6, rel=1e-6)
    assert got["dense backward"] == pytest.approx(TRUE["tok_b"] * 1e6, rel=1e-6)
    assert got["expert forward"] == pytest.approx(TRUE["row_f"] * 1e6, rel=1e-6)
    assert got["expert backward"] == pytest.approx(TRUE["row_b"] * 1e6, rel=1e-6)
    # traces keep times to the nanosecond: a 20 us latency comes back within a few of them
    assert got["link latency"] == pytest.approx(TRUE["latency"] * 1e6, abs=0.005)
    assert got["link bandwidth"] == pytest.approx(1 / TRUE["s_per_byte"] / 1e9, rel=1e-5)
    assert got["optimizer"] == pytest.approx(TRUE["opt"] * 1e9, rel=1e-6)
    assert got["step overhead"] == pytest.approx(TRUE["overhead"] * 1e3, abs=1e-4)
    # rank 0 computes 2048 - sent + received rows a layer: 3648, 1048 (rank 1: 3048), 2048, 2048; mean 2048
    assert cal.imbalance == pytest.approx((3648 + 3048 + 2048 + 2048) / (4 * 2048))
    # the fitted machine predicts a step of the synthetic layout from its parts
    info = read_run_info(runs[0])
    step = disaggregated(info.shape, cal.machine, 1, 1, 1).step_s
    assert step > info.shape.tokens_per_step * (TRUE["tok_f"] + TRUE["tok_b"])
    assert expert_parallel(info.shape, cal.machine, 2).step_s > 0


def test_lower_envelope_ignores_waiting(tmp_path: Path) -> None:
    """An all-to-all that waited for a skewed peer is slower than the wire, never faster: the fit keeps the
    fastest of each size bin."""
    run = expert_parallel_run(tmp_path)
    trace_path = run / "timelines" / "step_000005.json"
    trace = json.loads(trace_path.read_text())
    for e in trace["traceEvents"]:
        if e.get("name") == "combine":
            e["dur"] += 5000.0  # 5 ms of waiting for the peer
    trace_path.write_text(json.dumps(trace))
    got = {p["name"]: p["value"] for p in calibrate([disaggregated_run(tmp_path), run]).parameters}
    assert got["link bandwidth"] == pytest.approx(1 / TRUE["s_per_byte"] / 1e9, rel=1e-5)


def test_all_to_alls_of_one_size_fall_back_to_the_reference(tmp_path: Path) -> None:
    """Transfers within a factor 4 of each other pin a point, not a line: the reference decides."""
    from moe_trainer.report.calibration import fit_link

    same_size = [(1e6, 1e-3), (1.5e6, 1.2e-3), (1.2e6, 2e-3)]
    reference = [(n, 10e-6 + n / 1e9) for n in (1e5, 1e7)]
    latency, s_per_byte, source = fit_link(same_size, reference)
    assert (latency, s_per_byte) == (pytest.approx(10e-6), pytest.approx(1e-9)) and "comm.py" in source
    with pytest.raises(ValueError, match="reference_transfers"):
        fit_link(same_size, [])


def test_one_way_spans_do_not_time_the_link(tmp_path: Path) -> None:
    """Disaggregated transfers are posts and waits: without an all-to-all the link comes from the reference."""
    run = disaggregated_run(tmp_path)
    with pytest.raises(ValueError, match="reference_transfers"):
        calibrate([run])
    reference = [(n, 50e-6 + n / 2e9) for n in (1e5, 1e6, 1e7)]
    assert "comm.py" in next(p["fit"] for p in calibrate([run], reference_transfers=reference).parameters
                             if p["name"] == "link latency")
    got = {p["name"]: p["value"] for p in calibrate([run], reference_transfers=reference).parameters}
    assert got["link bandwidth"] == pytest.approx(2.0)
    assert got["link latency"] == pytest.approx(50.0)


def test_measured_step_leaves_out_warm_up(tmp_path: Path) -> None:
    run = disaggregated_run(tmp_path)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lines[0]["step_time_s_max"] = 100.0  # step 1: warm-up
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    assert measured_step_s(run) == pytest.approx(lines[-1]["step_time_s_max"])


def test_a_run_with_a_tokenizer_file_is_sized_by_its_vocabulary(tmp_path: Path) -> None:
    """The embedding and LM head follow the run's tokenizer.json, not the byte tokenizer's 257 ids."""
    from datasets import Dataset

    from moe_trainer.data.bpe import train_bpe

    run = disaggregated_run(tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["tokenizer"] = "bpe"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        read_run_info(run)
    with pytest.raises(ValueError, match="tokenizer.json"):
        run_info(cfg)  # the config alone does not say the vocabulary
    train_bpe(Dataset.from_dict({"text": ["the quick brown fox jumps over the lazy dog"] * 50}), 280).save(
        run / "tokenizer.json")
    assert read_run_info(run).shape.vocab == 280
    byte = config("disaggregated", num_coordinators=1, num_expert_actors=1, micro_batches=2)
    assert run_info(byte).shape.vocab == 257
