"""Run one function as N device processes joined in one process group: gloo on CPU, NCCL on cuda:rank.

The verification's DDP ranks and the sharded trials' FSDP ranks start here, each through
probe/lifetime.py, so a rank dies with the job that spawned it before it imports torch. A rank that
runs out of memory raises `RankOutOfMemory` after writing down what it measured: its peers may be
blocked in a collective waiting for it, so the first rank to fail stops all the others at once.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from probe.lifetime import start_guarded

RankEntry = Callable[..., None]  # entry(rank, world_size, *args), importable by name (it is pickled)
POLL_S = 0.05


class RankOutOfMemory(RuntimeError):
    """A device ran out of memory; raising it stops the peers that would wait for it."""


class RankFailed(RuntimeError):
    """A rank raised or died; the message ends with its error's last line."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(entry: RankEntry, world_size: int, device: str, args: tuple[Any, ...]) -> None:
    """Run `entry(rank, world_size, *args)` in `world_size` new processes, each a rank of one group.

    Returns when every rank has returned; raises `RankFailed` when one failed (the others are killed).
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fitprobe-ranks-") as error_dir:
        ranks = [start_guarded(_rank_process, (rank, entry, world_size, device, port, error_dir, args))
                 for rank in range(world_size)]
        try:
            while True:
                codes = [rank.poll() for rank in ranks]
                failed = next(((r, code) for r, code in enumerate(codes) if code is not None and code != 0), None)
                if failed is not None:
                    failed_rank, code = failed
                    raise RankFailed(_failure(failed_rank, code, Path(error_dir, f"rank{failed_rank}.txt")))
                if all(code == 0 for code in codes):
                    return
                time.sleep(POLL_S)
        finally:
            for rank in ranks:
                if rank.poll() is None:
                    rank.kill()
                rank.wait()


def _failure(rank: int, code: int, error_file: Path) -> str:
    if error_file.exists():
        return f"rank {rank} failed:\n{error_file.read_text()}"
    return f"rank {rank} exited with code {code}" if code > 0 else f"rank {rank} died from signal {-code}"


def _rank_process(rank: int, entry: RankEntry, world_size: int, device: str, port: int, error_dir: str,
                  args: tuple[Any, ...]) -> None:
    import torch

    from probe.sharding import process_group

    try:
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(rank)
        else:
            # the processes share the host's cores; oversubscribing them only makes every step slower
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        with process_group(world_size, rank, "nccl" if cuda else "gloo", f"tcp://127.0.0.1:{port}"):
            entry(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - told to the parent, which stops the peers; no traceback on stderr
        Path(error_dir, f"rank{rank}.txt").write_text(traceback.format_exc())
        sys.exit(1)
