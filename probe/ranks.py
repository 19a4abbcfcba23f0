"""Run one function as N device processes joined in one process group: gloo on CPU, NCCL on cuda:rank.

The verification's DDP ranks and the sharded trials' FSDP ranks start here. A rank that runs out of
memory raises `RankOutOfMemory` after writing down what it measured: its peers may be blocked in a
collective waiting for it, and a rank that raises makes `mp.spawn` stop all of them at once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from probe.lifetime import die_with_parent
from probe.sharding import process_group

RankEntry = Callable[..., None]  # entry(rank, world_size, *args), importable by name (it is pickled)


class RankOutOfMemory(RuntimeError):
    """A device ran out of memory; raising it stops the peers that would wait for it."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(entry: RankEntry, world_size: int, device: str, args: tuple[Any, ...]) -> None:
    """Run `entry(rank, world_size, *args)` in `world_size` new processes, each a rank of one group.

    Returns when every rank has returned; raises `mp.ProcessRaisedException` or
    `mp.ProcessExitedException` when one failed (the others are terminated).
    """
    mp.spawn(_rank_process, nprocs=world_size, join=True, args=(entry, world_size, device, free_port(), args))


def _rank_process(rank: int, entry: RankEntry, world_size: int, device: str, port: int, args: tuple[Any, ...]) -> None:
    die_with_parent()  # a rank must not outlive the job that spawned it (cancel, timeout, kill -9)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
    else:
        # the processes share the host's cores; oversubscribing them only makes every step slower
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    with process_group(world_size, rank, "nccl" if cuda else "gloo", f"tcp://127.0.0.1:{port}"):
        entry(rank, world_size, *args)
