"""Checkpoint save and load at 2 and 4 expert-parallel ranks: DCP against the earlier ``shard_rank*.pt`` format.

    python -m benchmarks.checkpoint_io [--ranks 2 4] [--d-model 512] [--layers 2] [--experts 32]
                                       [--expert-hidden 1024] [--formats dcp torch_save] [--ray]

Each rank is a spawned process holding what an expert-parallel actor holds for a checkpoint:
the dense part and its ``E / ranks`` experts (the model built with its ``expert_range``), and
AdamW state made by one optimizer step on random gradients (a checkpoint sees only the
tensors, not how they were trained). Ray, the data and the forward pass play no part in
checkpoint I/O, so they are left out: that keeps the processes small enough to run a
100M-parameter model on a shared 2-core box. The sizes not set here (every block MoE, top-2,
the aux loss alone) are those of ``benchmarks.common.OLD_DEFAULT``, what docs/benchmarks.md
measured.

- **save**: every rank at once (DCP's save is a collective over a gloo group), timed
  between barriers; then the driver's part (``meta.json`` with every file's SHA-256, the
  rename) as ``complete_s``. DCP also in the background (``train.async_checkpoint``):
  ``blocking_s`` is what training waits for (the copy of the rank's entries).
- **load**: each rank in a fresh process, one after another (loading has no collectives in
  either format, so a rank's cost does not depend on the others running; one at a time keeps
  the peak of the whole box low). Peak RSS is the process's ``VmHWM``, reset just before the
  load (``/proc/self/clear_refs``); bytes read are ``/proc/self/io`` ``rchar``.
  ``state_at_peak_x`` = (the rank's parameters, already resident, + the RSS the load added at
  its peak) / the rank's own state (parameters + AdamW moments): 1.0 means loading cost
  nothing beyond the state the rank must hold anyway.

``--ray`` also loads inside real actors: ``expert_parallel`` trains 2 steps, saves, and a new
group of actors loads, each measuring its own load (``__ray_call__``).

``torch_save`` is the format before DCP, written and read as that code did (kept here only
to measure it): one ``torch.save`` of cloned entries per rank; every rank reads every file
whole, stacks its experts, then ``load_state_dict``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.common import OLD_DEFAULT, config, loadavg, print_table, write_json
from benchmarks.procs import run_ranks, timed_after_barrier

FORMATS = ("dcp", "torch_save")


def _config(args: dict[str, int]) -> Any:
    return config([*OLD_DEFAULT, f"model.d_model={args['d_model']}", f"model.n_layers={args['layers']}",
                   "model.n_heads=8", f"moe.num_experts={args['experts']}",
                   f"moe.expert_hidden={args['expert_hidden']}", "logger.mode=disabled", "logger.progress=false"])[0]


def build_rank_state(args: dict[str, int], rank: int, ranks: int, with_state: bool) -> SimpleNamespace:
    """Rank ``rank``'s model shard and optimizer, with AdamW state after one step when ``with_state``."""
    from moe_trainer.engine import build_model
    from moe_trainer.moe.dispatcher import Dispatcher, LocalTransport
    from moe_trainer.train.optim import build_optimizer

    cfg = _config(args)
    local = args["experts"] // ranks
    torch.manual_seed(rank)
    model = build_model(cfg, 257, dispatcher=Dispatcher(args["experts"], None, LocalTransport()),
                        expert_range=(rank * local, local))
    optimizer = build_optimizer(model, cfg.train)
    if with_state:
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        optimizer.step()
        for p in model.parameters():
            p.grad = None
    return SimpleNamespace(model=model, optimizer=optimizer, step=2, tokens_seen=4096,
                           ctx=SimpleNamespace(device=torch.device("cpu")))


def own_state_bytes(trainer: SimpleNamespace) -> tuple[int, int]:
    """(parameter bytes, parameter + AdamW moment bytes) this rank holds."""
    params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    return params, 3 * params


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


# --- the format before DCP, as its code wrote and read it -----------------------------------------------------

def _old_save(directory: Path, trainer: SimpleNamespace, rank: int) -> None:
    from moe_trainer.train.sharded_checkpoint import canonical_state

    entries = {k: v.detach().cpu().clone() for k, v in canonical_state(trainer, dense=rank == 0).items()}
    torch.save(entries, directory / f"shard_rank{rank:05d}.pt")


def _old_load(directory: Path, trainer: SimpleNamespace) -> None:
    """The earlier ``load_into``: every shard whole, each layout's tensors stacked, then ``load_state_dict``."""
    from moe_trainer.train.checkpoint_io import read_legacy
    from moe_trainer.train.sharded_checkpoint import _expert_params, _param_names

    entries = read_legacy(directory)
    first = _expert_params(trainer)

    def take(prefix: str, name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in first:
            return entries[f"{prefix}/{name}"]
        return torch.stack([entries[f"{prefix}/{name}/expert{first[name] + e}"] for e in range(like.shape[0])])

    trainer.model.load_state_dict({n: take("model", n, t) for n, t in trainer.model.state_dict().items()})
    params = dict(trainer.model.named_parameters())
    opt_state = trainer.optimizer.state_dict()
    opt_state["state"] = {i: {"step": entries[f"optim/{n}/step"],
                              **{f: take(f"optim.{f}", n, params[n]) for f in ("exp_avg", "exp_avg_sq")}}
                          for i, n in enumerate(_param_names(trainer)) if f"optim/{n}/step" in entries}
    trainer.optimizer.load_state_dict(opt_state)
    trainer.step = int(entries["trainer/step"])


# --- the ranks ----------------------------------------------------------------------------------------------

def save_rank(rank: int, world: int, port: int, args: dict[str, int], fmt: str, directory: str,
              background: bool) -> dict[str, float]:
    import torch.distributed as tdist

    from moe_trainer.train.sharded_checkpoint import save_shard

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        trainer = build_rank_state(args, rank, world, with_state=True)
        out = Path(directory)
        if fmt == "torch_save":
            seconds = timed_after_barrier(lambda: _old_save(out, trainer, rank), None)
            return {"save_s": seconds}
        group = tdist.new_group(list(range(world)), backend="gloo")
        if not background:
            return {"save_s": timed_after_barrier(lambda: save_shard(out, trainer, group, dense=rank == 0), group)}
        waits: list[Any] = []
        blocking = timed_after_barrier(lambda: waits.append(save_shard(out, trainer, group, dense=rank == 0,
                                                                       background=True)), group)
        t0 = time.perf_counter()
        waits[0]()
        return {"save_s": blocking + time.perf_counter() - t0, "blocking_s": blocking}
    finally:
        tdist.destroy_process_group()


def load_rank(rank: int, world: int, port: int, args: dict[str, int], ranks: int, fmt: str,
              directory: str) -> dict[str, float]:
    """Loads rank ``rank`` of a ``ranks``-rank layout in this fresh process (``world`` is 1: no group)."""
    from moe_trainer.train.sharded_checkpoint import load_into

    torch.set_num_threads(1)
    trainer = build_rank_state(args, rank, ranks, with_state=False)
    params, own = own_state_bytes(trainer)
    rss_before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    read0, t0 = _rchar(), time.perf_counter()
    (_old_load if fmt == "torch_save" else load_into)(Path(directory), trainer)
    seconds = time.perf_counter() - t0
    added = _status("VmHWM") - rss_before
    return {"load_s": seconds, "read_mb": (_rchar() - read0) / 2**20, "rss_before_mb": rss_before,
            "load_peak_added_mb": added, "own_state_mb": own / 2**20,
            "state_at_peak_x": (params / 2**20 + added) / (own / 2**20)}


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("MemAvailable:"))


def wait_for_memory(need_mb: float, timeout_s: float = 900) -> None:
    """Waits until the box has ``need_mb`` to spare (other jobs share it); refuses to start otherwise."""
    deadline = time.monotonic() + timeout_s
    while _mem_available_mb() < need_mb:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {_mem_available_mb():.0f} MiB available, {need_mb:.0f} needed: not started")
        time.sleep(5)


def measure(args: dict[str, int], ranks: int, fmt: str, background: bool, root: Path,
            state_mb: float) -> dict[str, Any]:
    from moe_trainer.train.checkpoint import begin_checkpoint

    pending = begin_checkpoint(root, 2, {"benchmark": "checkpoint_io"})
    wait_for_memory(ranks * (350 + 2 * state_mb / ranks) + 500)
    saves = run_ranks(save_rank, ranks, args, fmt, str(pending.tmp), background)
    t0 = time.perf_counter()
    path = pending.complete()
    complete_s = time.perf_counter() - t0
    files_mb = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    row: dict[str, Any] = {"format": fmt + (" (background)" if background else ""), "ranks": ranks,
                           "files_mb": files_mb, "save_s": max(s["save_s"] for s in saves), "complete_s": complete_s}
    if background:
        row["blocking_s"] = max(s["blocking_s"] for s in saves)
        shutil.rmtree(path)
        return row
    loads = []
    for rank in range(ranks):
        wait_for_memory(350 + state_mb * (1.0 if fmt == "torch_save" else 0.0) + 2 * state_mb / ranks + 500)
        loads.append(run_ranks(load_rank, 1, args, ranks, fmt, str(path))[0] | {"rank": rank})
    shutil.rmtree(path)
    worst = max(loads, key=lambda r: r["state_at_peak_x"])
    row.update(load_s=max(r["load_s"] for r in loads), read_mb_max=max(r["read_mb"] for r in loads),
               own_state_mb_max=max(r["own_state_mb"] for r in loads),
               load_peak_added_mb_max=max(r["load_peak_added_mb"] for r in loads),
               state_at_peak_x_max=worst["state_at_peak_x"], per_rank=loads)
    return row


# --- the same load inside real Ray actors (``--ray``): the actors of an expert_parallel run --------------------

def _measured_actor_load(worker: Any, path: str) -> dict[str, float]:
    """Runs inside a TrainWorker (``__ray_call__``): its own load of ``path``, with peak RSS and bytes read."""
    runner = worker.setup.runner
    params, own = own_state_bytes(runner)
    rss_before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    read0, t0 = _rchar(), time.perf_counter()
    worker.load(path)
    seconds = time.perf_counter() - t0
    added = _status("VmHWM") - rss_before
    return {"load_s": seconds, "read_mb": (_rchar() - read0) / 2**20, "own_state_mb": own / 2**20,
            "load_peak_added_mb": added, "state_at_peak_x": (params / 2**20 + added) / (own / 2**20)}


def ray_load(args: dict[str, int], ranks: int, root: Path) -> dict[str, Any]:
    """Trains 2 steps of expert_parallel with ``ranks`` actors, saves, and loads into a new group of actors."""
    import ray

    from actors.engine import RayEngine

    cfg = config([*OLD_DEFAULT, f"model.d_model={args['d_model']}", f"model.n_layers={args['layers']}",
                  "model.n_heads=8", f"moe.num_experts={args['experts']}", f"moe.expert_hidden={args['expert_hidden']}",
                  "parallel=expert_parallel", f"parallel.num_actors={ranks}", "parallel.cpus_per_actor=0.5",
                  "train.batch_size=4", "data.seq_len=64", "train.max_steps=2", "logger.mode=disabled",
                  "logger.progress=false"])[0]
    engine = RayEngine(cfg)
    engine.train(2)
    path = engine.save(root)
    engine.close(keep_cluster=True)
    engine = RayEngine(cfg)
    try:
        loads = ray.get([a.__ray_call__.remote(_measured_actor_load, str(path)) for a in engine.group.actors])
    finally:
        engine.close(keep_cluster=True)
        shutil.rmtree(path)
    return {"format": "dcp (Ray actors)", "ranks": ranks, "load_s": max(r["load_s"] for r in loads),
            "read_mb_max": max(r["read_mb"] for r in loads), "own_state_mb_max": max(r["own_state_mb"] for r in loads),
            "load_peak_added_mb_max": max(r["load_peak_added_mb"] for r in loads),
            "state_at_peak_x_max": max(r["state_at_peak_x"] for r in loads), "per_rank": loads}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--expert-hidden", type=int, default=1024)
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--no-background", action="store_true", help="skip the background (async) DCP save")
    p.add_argument("--ray", action="store_true", help="also load inside the actors of a real expert_parallel run")
    p.add_argument("--dir", type=Path, default=None, help="where checkpoints are written (default: a temp dir)")
    p.add_argument("--json", default="checkpoint_io", help="result name under benchmarks/results/")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    args = {"d_model": a.d_model, "layers": a.layers, "experts": a.experts, "expert_hidden": a.expert_hidden}
    full = build_rank_state(args, 0, 1, with_state=False)
    n_params = sum(p.numel() for p in full.model.parameters())
    state_mb = own_state_bytes(full)[1] / 2**20
    del full
    print(f"model: {n_params / 1e6:.1f}M parameters, {state_mb:.0f} MiB of parameters + AdamW moments; "
          f"load average {loadavg()}")
    root = Path(a.dir or tempfile.mkdtemp(prefix="ckpt_io_"))
    rows = []
    for ranks in a.ranks:
        for fmt in a.formats:
            rows.append(measure(args, ranks, fmt, False, root, state_mb))
            print_table(rows[-1:], ["format", "ranks", "files_mb", "save_s", "complete_s", "load_s", "read_mb_max",
                                    "own_state_mb_max", "load_peak_added_mb_max", "state_at_peak_x_max"])
        if "dcp" in a.formats and not a.no_background:
            rows.append(measure(args, ranks, "dcp", True, root, state_mb))
    if a.ray:
        from actors import keep_embedded_ray_on_loopback

        keep_embedded_ray_on_loopback(None)
        for ranks in a.ranks:
            wait_for_memory(ranks * (900 + 3 * state_mb / ranks) + 1000)
            rows.append(ray_load(args, ranks, root))
    print()
    print_table(rows, ["format", "ranks", "files_mb", "save_s", "blocking_s", "complete_s", "load_s", "read_mb_max",
                       "own_state_mb_max", "load_peak_added_mb_max", "state_at_peak_x_max"])
    path = write_json(a.json, {"params": n_params, "state_mb": state_mb, "args": args, "rows": rows,
                               "loadavg_end": loadavg(), "pid": os.getpid()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
