"""Run one function as N device processes joined in one process group: gloo on CPU, NCCL on cuda:rank.

The verification's DDP ranks and the sharded trials' FSDP ranks start here, forked from this process's fork
server (probe/forked.py), which imported torch, the rank entries and transformers' model code once
(rank_preload.py): a fresh interpreter per rank spent about 5 s of CPU importing them, every trial again. A rank
dies with the fork server, and the fork server with the job (or command) that spawned it.

One protocol brings results back, whatever the ranks run: the entry returns a JSON value, which its
process writes to a result file the parent reads. A rank that runs out of memory raises
`RankOutOfMemory(result)` instead: its result is written the same way, then the group stops at once,
because its peers may be blocked in a collective waiting for it. That is a verdict, not a failure;
any other error in a rank is (`RankFailed`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from fitprobe.probe.forked import start_forked

RankEntry = Callable[..., Any]  # entry(rank, world_size, *args) -> JSON value, importable by name (it is pickled)
PRELOAD = "fitprobe.probe.verify.rank_preload"
POLL_S = 0.05
STOPPED_EXIT = 3  # a rank that ran out of memory and wrote its result: stop the peers, read the results


class RankOutOfMemory(RuntimeError):
    """A device ran out of memory; `result` is what it measured, returned like an entry's value."""

    def __init__(self, result: Any) -> None:
        super().__init__("a rank ran out of memory")
        self.result = result


class RankFailed(RuntimeError):
    """A rank raised or died; the message ends with its error's last line."""


@dataclass
class RankResults:
    """What the ranks returned, by rank: None for a rank stopped before it wrote its result."""

    results: list[Any]
    stopped_by: int | None = None  # the rank that ran out of memory and stopped the group


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(entry: RankEntry, world_size: int, device: str, args: tuple[Any, ...]) -> RankResults:
    """Run `entry(rank, world_size, *args)` in `world_size` new processes, each a rank of one group.

    Returns every rank's result when all returned, or when one ran out of memory (`stopped_by`; the
    others are killed); raises `RankFailed` when one failed otherwise (the others are killed).
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fitprobe-ranks-") as run_dir:
        # parent_main=False: a rank needs nothing of the script that called fitprobe, and must not run it again
        ranks = [start_forked([PRELOAD], _rank_process, rank, entry, world_size, device, port, run_dir, args,
                              parent_main=False) for rank in range(world_size)]
        try:
            failed = _wait(ranks)
        finally:
            for rank in ranks:
                if rank.exitcode is None:
                    rank.kill()
                rank.join()
        written = [_read_result(Path(run_dir), rank) for rank in range(world_size)]
        results = RankResults([w[1] if w else None for w in written])
        if failed is None:
            return results
        # a peer of the rank that ran out of memory may fail first (its collective lost a member):
        # the result file, written before the group broke, tells which rank stopped it
        results.stopped_by = next((rank for rank, w in enumerate(written) if w and w[0]), None)
        if results.stopped_by is None:
            failed_rank, code = failed
            raise RankFailed(_failure(failed_rank, code, Path(run_dir, f"rank{failed_rank}.txt")))
        return results


def _wait(ranks: list[BaseProcess]) -> tuple[int, int] | None:
    """Block until every rank returned (None) or one exited otherwise: (rank, exit code)."""
    while True:
        codes = [rank.exitcode for rank in ranks]
        failed = next(((r, code) for r, code in enumerate(codes) if code is not None and code != 0), None)
        if failed is not None:
            return failed
        if all(code == 0 for code in codes):
            return None
        time.sleep(POLL_S)


def _write_result(run_dir: str, rank: int, result: Any, stopped: bool) -> None:
    # written whole then renamed: a rank killed while writing leaves no half a file to misread
    path = Path(run_dir, f"rank{rank}.json")
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"stopped": stopped, "result": result}))
    os.replace(partial, path)


def _read_result(run_dir: Path, rank: int) -> tuple[bool, Any] | None:
    path = run_dir / f"rank{rank}.json"
    if not path.exists():
        return None
    written = json.loads(path.read_text())
    return written["stopped"], written["result"]


def _failure(rank: int, code: int, error_file: Path) -> str:
    if error_file.exists():
        return f"rank {rank} failed:\n{error_file.read_text()}"
    return f"rank {rank} exited with code {code}" if code > 0 else f"rank {rank} died from signal {-code}"


def _rank_process(rank: int, entry: RankEntry, world_size: int, device: str, port: int, run_dir: str,
                  args: tuple[Any, ...]) -> None:
    # torch and the process group only here, in the rank (the fork server imported them): the parent that spawns
    # ranks does not need them
    import torch

    from fitprobe.probe.sharding import process_group

    try:
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(rank)
        else:
            # the processes share the host's cores; oversubscribing them only makes every step slower
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        with process_group(world_size, rank, "nccl" if cuda else "gloo", f"tcp://127.0.0.1:{port}"):
            try:
                result = entry(rank, world_size, *args)
            except RankOutOfMemory as stop:
                # written inside the group: leaving it would let the peers fail before the result exists
                _write_result(run_dir, rank, stop.result, stopped=True)
                raise
            _write_result(run_dir, rank, result, stopped=False)
    except RankOutOfMemory:
        sys.exit(STOPPED_EXIT)
    except BaseException:  # noqa: BLE001 - told to the parent, which stops the peers; no traceback on stderr
        Path(run_dir, f"rank{rank}.txt").write_text(traceback.format_exc())
        sys.exit(1)
