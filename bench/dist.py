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


class Dist:
    """This process's rank among `world` processes (WORLD_SIZE/RANK from accelerate or torchrun), and the
    collective operations the runner needs; with one process every operation is the identity."""

    def __init__(self, device: str = "cpu"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            from accelerate import PartialState

            state = PartialState(cpu=not str(device).startswith("cuda"))
            self.rank, self.world = state.process_index, state.num_processes

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
        """Every process's rows for its shard of n items, concatenated in rank order: [n, ...]."""
        if self.world == 1:
            return x
        per = -(-n // self.world)  # the largest shard
        if x.shape[0] < per:  # pad to equal length for all_gather (zeros; trimmed below)
            x = torch.cat([x, torch.zeros(per - x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)])
        out = [torch.empty_like(x) for _ in range(self.world)]
        torch.distributed.all_gather(out, x.contiguous())
        return torch.cat([part[: len(self.shard(n, r))] for r, part in enumerate(out)])

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise float64 sum of `values` over processes."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

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
