"""The Ray actor of the data- and expert-parallel strategies: a thin shell around one rank's Trainer.

It runs whole chunks of steps per call and returns their metrics, so Ray's
per-call cost is paid once per chunk, not per step or per layer.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import ray
import torch

from moe_trainer.config.schema import Config


@ray.remote
class TrainWorker:
    def __init__(self, cfg: Config, rank: int) -> None:
        self.cfg, self.rank = cfg, rank
        torch.set_num_threads(max(1, int(cfg.parallel.cpus_per_actor)))
        self.setup: Any = None

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port; rank 0's becomes everyone's rendezvous."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def join(self, master_addr: str, master_port: int) -> dict[str, Any]:
        from moe_trainer.parallel.setup import build_rank, local_parameter_counts

        self.setup = build_rank(self.cfg, self.rank, master_addr, master_port)
        return {"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "backend": self.setup.backend, "expert_range": list(self.setup.topology.expert_range),
                **local_parameter_counts(self.setup.trainer)}

    def train(self, num_steps: int) -> list[dict[str, Any]]:
        trainer = self.setup.trainer
        return [trainer.train_step().record for _ in range(num_steps)]

    def evaluate(self) -> float:
        return self.setup.trainer.evaluate()

    def save(self, root: str) -> None:
        from moe_trainer.train.sharded_checkpoint import save_shard

        save_shard(Path(root), self.setup.trainer, self.setup.topology)

    def load(self, path: str) -> None:
        from moe_trainer.train.sharded_checkpoint import load_into

        load_into(Path(path), self.setup.trainer)

    def expert_weights(self) -> dict[str, Any]:
        """Global expert indices and tensors held here (for tests that check sharding)."""
        out = {}
        for name, param in self.setup.trainer.model.named_parameters():
            out[name] = param.detach().cpu()
        return out
