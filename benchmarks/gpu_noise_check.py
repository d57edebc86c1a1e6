"""The selection noise on a GPU: the same bits as on the CPU, no host sync, and what it costs beside top-k.

    python -m benchmarks.gpu_noise_check                     # CUDA; well under a minute on one H200
    python -m benchmarks.gpu_noise_check --device cpu        # the same path on the CPU (what CI runs)

``moe.selection_noise`` is hashed per token (:mod:`moe_trainer.moe.routing_noise`) so that every
layout draws what ``single`` draws; the docs claim the hash gives the same bits on every device
(integer arithmetic wraps modulo 2**64, 24-bit uniforms convert to fp32 exactly). This checks it:
keys and noise computed on the device against the CPU's, bit for bit, over layers past int64's
salt range and a seed past 2**63; a training-mode router forward with the noise under
``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises); and the noise's time per
layer against the router's top-k, timed with CUDA events. Needs only torch. Prints a table, writes
``benchmarks/results/gpu_noise_check.json`` (or ``--json PATH``), exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from moe_trainer.config.schema import MoEConfig
from moe_trainer.moe.router import Router
from moe_trainer.moe.routing_noise import routing_keys, uniform_noise
from moe_trainer.timing import Span, mark

EXPERTS = 64
LAYERS = (0, 1, 9, 63)


def same_bits(device: torch.device, rows: int, seq: int) -> dict[str, bool]:
    """Keys and noise on ``device`` against the CPU's, bit for bit."""
    idx = torch.randint(0, 257, (rows, seq), generator=torch.Generator().manual_seed(0))
    out = {}
    for seed in (0, 2**63 + 5):
        cpu_keys, dev_keys = routing_keys(idx, seed), routing_keys(idx.to(device), seed)
        out[f"keys seed {seed}"] = torch.equal(cpu_keys, dev_keys.cpu())
        for layer in LAYERS:
            cpu = uniform_noise(cpu_keys.flatten(), layer, EXPERTS)
            dev = uniform_noise(dev_keys.flatten(), layer, EXPERTS).cpu()
            out[f"noise seed {seed} layer {layer}"] = torch.equal(cpu.view(torch.int32), dev.view(torch.int32))
    return out


def no_host_sync(device: torch.device, tokens: int) -> bool:
    """A training-mode router forward with the noise on, every host sync an error (CUDA only)."""
    router = Router(32, MoEConfig(num_experts=EXPERTS, top_k=8, bias_balancing=True, selection_noise=0.005)).to(device)
    x = torch.randn(tokens, 32, device=device)
    keys = routing_keys(torch.randint(0, 257, (1, tokens), device=device), 0).flatten()
    if device.type != "cuda":
        router(x, noise_keys_T=keys)
        return True
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        router(x, noise_keys_T=keys, layer=3)
    except RuntimeError as err:
        print(f"host sync in the router's forward: {err}")
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return True


def timed_ms(fn: Any, device: torch.device, repeat: int = 20) -> float:
    """Milliseconds per call over ``repeat`` calls after one warm-up: the project's marks
    (:mod:`moe_trainer.timing`: CUDA events read once at the end, wall clock on the CPU)."""
    fn()
    start = mark(device)
    for _ in range(repeat):
        fn()
    return Span.since(start, device).seconds() * 1000 / repeat


def cost(device: torch.device, tokens: int) -> dict[str, float]:
    """The noise of one layer against that layer's top-8 of 64, at ``tokens`` tokens."""
    keys = routing_keys(torch.randint(0, 257, (tokens // 128, 128), device=device), 0).flatten()
    scores = torch.rand(tokens, EXPERTS, device=device)
    noise_ms = timed_ms(lambda: uniform_noise(keys, 1, EXPERTS), device)
    topk_ms = timed_ms(lambda: scores.topk(8, dim=-1), device)
    return {"tokens": tokens, "noise_ms": noise_ms, "topk_ms": topk_ms, "ratio": noise_ms / topk_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="benchmarks/results/gpu_noise_check.json")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU test)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows, sizes = (4, [2048]) if args.quick else (128, [16384, 131072])
    bits = same_bits(device, rows, 128)
    sync_free = no_host_sync(device, 2048 if args.quick else 16384)
    costs = [cost(device, t) for t in sizes]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    for check, ok in bits.items():
        print(f"{check:32s} {'same bits as the CPU' if ok else 'DIFFERS from the CPU'}")
    print(f"{'router forward with noise':32s} {'no host sync' if sync_free else 'HOST SYNC'}")
    print("| tokens | noise (ms) | top-8 of 64 (ms) | noise / top-k |\n|---:|---:|---:|---:|")
    for c in costs:
        print(f"| {c['tokens']} | {c['noise_ms']:.3f} | {c['topk_ms']:.3f} | {c['ratio']:.2f} |")
    result = {"device": name,
              "torch": torch.__version__, "cuda": torch.version.cuda, "same_bits": bits,
              "no_host_sync": sync_free, "cost": costs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if all(bits.values()) and sync_free else 1


if __name__ == "__main__":
    sys.exit(main())
