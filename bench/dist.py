"""Multi-process sampling and metrics (`accelerate launch` / `torchrun`), identical to one process.

Per-sample seeds make every image independent of which process draws it and of the batch it is in;
each process samples a contiguous, balanced shard of the prompts (sizes differ by at most one; a
shard may be empty when there are more processes than prompts), shards are padded to equal length
for the collective, gathered in rank order and trimmed, so the gathered set equals a one-process
run's sample for sample. Process 0 alone writes files and measures latency.
"""

from __future__ import annotations

import os

import torch


def collective_device(backend: str | None, local: torch.device) -> torch.device:
    """The device a backend's collectives take tensors on: `local` (cuda:LOCAL_RANK) for NCCL, which takes CUDA
    tensors only; the CPU for gloo, and for a mixed backend that serves CPU tensors ("cuda:nccl,cpu:gloo")."""
    if backend is None or "gloo" in backend:
        return torch.device("cpu")
    return torch.device(local)


class Dist:
    """This process's rank among `world` processes (WORLD_SIZE/RANK from accelerate or torchrun), and the
    collective operations the runner needs; with one process every operation is the identity.

    ``device`` is where the collectives' tensors live (``collective_device``): every tensor is moved there for
    the operation and back to its own device after, so a CUDA run on NCCL never hands it a CPU tensor.
    ``run_device`` is the device this process samples on: under several CUDA processes, its own GPU.
    """

    def __init__(self, device: str = "cpu"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.backend: str | None = None
        self.device = torch.device("cpu")
        self.requested = str(device)
        if self.world > 1:
            from accelerate import PartialState

            state = PartialState(cpu=not self.requested.startswith("cuda"))
            self.rank, self.world, self.local_rank = state.process_index, state.num_processes, state.local_process_index
            self.backend = torch.distributed.get_backend()
            self.device = collective_device(self.backend, state.device)

    @property
    def run_device(self) -> str:
        """The device this process samples and trains on: "cuda" becomes this process's own "cuda:LOCAL_RANK" when
        several processes share a machine (each on its GPU); anything else as asked."""
        if self.world > 1 and self.requested == "cuda":
            return f"cuda:{self.local_rank}"
        return self.requested

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def shard(self, n: int, rank: int | None = None) -> range:
        """A process's contiguous share of n items: rank r gets [r·n/world, (r+1)·n/world)."""
        r = self.rank if rank is None else rank
        return range(r * n // self.world, (r + 1) * n // self.world)

    def gather(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Every process's rows for its shard of n items, concatenated in rank order: [n, ...] on x's device."""
        if self.world == 1:
            return x
        per = -(-n // self.world)  # the largest shard
        home, x = x.device, x.to(self.device)
        if x.shape[0] < per:  # pad to equal length for all_gather (zeros; trimmed below)
            x = torch.cat([x, torch.zeros(per - x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)])
        out = [torch.empty_like(x) for _ in range(self.world)]
        torch.distributed.all_gather(out, x.contiguous())
        return torch.cat([part[: len(self.shard(n, r))] for r, part in enumerate(out)]).to(home)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise float64 sum of `values` over processes."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def gather_objects(self, obj) -> list:
        """Every process's (small, picklable) `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
