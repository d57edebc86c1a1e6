"""Merges the per-rank metrics records of one step into the one record the driver logs.

Values that every rank computed from all-reduced tensors (losses, loads) are
taken from rank 0. Values that differ per rank (timings, rows moved) appear as
the mean under their own name, plus ``_max``, ``_argmax`` (the slowest rank) and
``_per_rank``, so stragglers show. A sampled step's timeline events (``"timeline"``,
one list per rank) are joined into one list of every rank's events: the driver writes
them as the step's trace file and logs none of them as metrics.
"""

from __future__ import annotations

from typing import Any

from moe_trainer.logging.metric_keys import RANK_ARGMAX, RANK_MAX
from moe_trainer.parallel.telemetry import PHASES, phase_key

PER_RANK_KEYS = ("step_time_s", "mem_rss_mb", "mem_peak_rss_mb", "mem_optim_state_mb", "mem_optim_dense_state_mb",
                 "load_imbalance_local", "grad_sync_time_s", "param_sync_time_s", "a2a_time_s", "a2a_rows_sent",
                 "a2a_rows_recv", "a2a_bytes_sent",
                 *(phase_key(phase, what) for phase in PHASES for what in ("rows_sent", "rows_recv", "time_s")))
# disaggregated: what each expert actor reports, logged as the mean over the actors and their maximum
EXPERT_ROLE_KEYS = ("expert_busy_s", "expert_wait_s", "expert_step_time_s", "expert_rows_recv", "expert_mem_rss_mb",
                    "expert_mem_peak_rss_mb", "expert_mem_optim_state_mb")


TIMELINE_KEY = "timeline"


def merge_timelines(record: dict[str, Any], per_rank: list[dict[str, Any]]) -> None:
    """Appends the timeline events of ``per_rank`` to ``record``'s (in place; ranks without one add nothing)."""
    lists = [r[TIMELINE_KEY] for r in per_rank if r.get(TIMELINE_KEY) is not None]
    if lists:
        record[TIMELINE_KEY] = [*record.get(TIMELINE_KEY, []), *(e for events in lists for e in events)]


def aggregate_step(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    record = dict(per_rank[0])
    record.pop(TIMELINE_KEY, None)  # rank 0's events are not the step's: every rank's are
    merge_timelines(record, per_rank)
    for key in PER_RANK_KEYS:
        if key not in record:
            continue
        values = [r[key] for r in per_rank]
        slowest = max(range(len(values)), key=values.__getitem__)
        record[key] = sum(values) / len(values)
        record[key + RANK_MAX] = values[slowest]
        record[key + RANK_ARGMAX] = slowest
        record[f"{key}_per_rank"] = values
    # the step ends when the slowest rank ends
    step_time = record.get("step_time_s" + RANK_MAX, record["step_time_s"])
    record["tokens_per_s"] = record["tokens_step"] / step_time
    if "a2a_time_s" in record:
        record["comm_share"] = (record["a2a_time_s"] + record.get("grad_sync_time_s", 0.0)
                                + record.get("param_sync_time_s", 0.0)) / max(record["step_time_s"], 1e-12)
    return record


def aggregate_chunk(records_per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``records_per_rank[r][i]`` is rank r's record of the chunk's i-th step."""
    return [aggregate_step(list(step)) for step in zip(*records_per_rank, strict=True)]


def add_expert_role(records: list[dict[str, Any]], expert_records_per_rank: list[list[dict[str, Any]]]) -> None:
    """Adds per-role busy/wait telemetry of a disaggregated step (in place).

    Coordinators wait inside all-to-alls (for the expert actors and the wire);
    expert actors wait for coordinators between their bursts of expert compute.
    The expert actors' timeline events of a sampled step join the coordinators'.
    """
    for record, expert_steps in zip(records, zip(*expert_records_per_rank, strict=True), strict=True):
        merge_timelines(record, list(expert_steps))
        step_time = max(record["step_time_s"], 1e-12)
        record["coord_wait_s"] = record["a2a_time_s"]
        record["coord_busy_s"] = record["step_time_s"] - record["a2a_time_s"]
        record["coord_idle_share"] = record["coord_wait_s"] / step_time
        for key in EXPERT_ROLE_KEYS:
            values = [r[key] for r in expert_steps]
            record[key] = sum(values) / len(values)
            record[key + RANK_MAX] = max(values)
            record[f"{key}_per_actor"] = values
        record["expert_idle_share"] = record["expert_wait_s"] / max(record["expert_step_time_s"], 1e-12)
