"""Processes for ``altlora train``: re-launch under torchrun, and the per-process context.

``altlora train --nproc N`` (N > 1, not already under torchrun) re-runs the same command as
``python -m torch.distributed.run --standalone --nproc_per_node N -m altlora.cli -- ...``. Each
process then calls :func:`setup`, which joins the process group (gloo on CPU, nccl on CUDA)
and says which rank it is and which device it drives. A plain single process gets a
``Dist`` with ``world == 1`` and no process group, so the training loop has one code path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["Dist", "under_torchrun", "relaunch", "setup", "teardown", "main_process_first"]


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: object) -> list:
        """``obj`` of every process, in rank order."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``altlora <argv>`` in ``nproc`` processes under torchrun; returns its exit status."""
    # "--": torchrun must not read our flags as abbreviations of its own (--r, --nproc, ...)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "altlora.cli", "--", *argv]
    return subprocess.run(cmd).returncode


def setup(device: str = "auto") -> Dist:
    """Join the process group when started by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def main_process_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block first (fetching assets, preparing the output folder), then the rest."""
    if not d.is_main:
        d.barrier()
    yield
    if d.is_main:
        d.barrier()
