"""Where the test suite's CPU goes: per test, the worker's own CPU, its reaped children's, and the machine's.

On the 2-core host the suite is CPU-bound (vmstat: about 6 % idle under `-n auto`), so its wall time is roughly its
CPU time over two cores, and making CI faster means spending less CPU, not waiting less. This says who spends it.
- `self`: the pytest process's own CPU during the test (fake-tensor traces, CPU training, TestClient routes).
- `children`: CPU of the processes it started and reaped during the test (CLI runs, gloo ranks, a server it
  stopped, with what that server reaped). A process left to init (the fork server of a killed server, its jobs)
  is in no one's `children`.
- `machine`: every process's CPU on the host from /proc/stat, orphans, Ray's daemons and the browser included.
  It is the test's own only when the test runs alone: read it from a `-n 0` run.

Run:  FITPROBE_SUITE_CPU=cpu.jsonl python -m pytest -p bench.suite_cpu [-n 0] [tests ...]
      python bench/suite_cpu.py cpu.jsonl        (sums by layer and module, the costliest first)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

LAYERS = ("unit", "estimate", "api", "wire")  # tests/conftest.py marks every test with one


def _own_and_children_s() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _machine_busy_s() -> float:
    """CPU seconds the whole host has been busy since boot: every field of /proc/stat's `cpu` line but idle and
    iowait."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Around setup, call and teardown alike: a module's server starts in its first test's setup."""
    own, children = _own_and_children_s()
    machine, started = _machine_busy_s(), time.monotonic()
    yield
    own_after, children_after = _own_and_children_s()
    layer = next((name for name in LAYERS if item.get_closest_marker(name)), "unmarked")
    row = {"test": item.nodeid, "layer": layer, "wall": time.monotonic() - started, "self": own_after - own,
           "children": children_after - children, "machine": _machine_busy_s() - machine}
    with open(os.environ.get("FITPROBE_SUITE_CPU", "suite-cpu.jsonl"), "a") as out:
        out.write(json.dumps(row) + "\n")


def summarise(path: str, top: int) -> str:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    columns = ("wall", "self", "children", "machine")
    lines = [f"{len(rows)} tests; seconds summed over tests (with -n 2, wall sums to about twice pytest's)"]
    for key, title in (("layer", "layer"), ("module", "module")):
        sums: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for row in rows:
            group = row["layer"] if key == "layer" else row["test"].split("::")[0]
            sums[group].update({column: row[column] for column in columns})
        ranked = sorted(sums.items(), key=lambda item: -(item[1]["self"] + item[1]["children"]))
        lines.append(f"\n{title:44} " + " ".join(f"{column:>9}" for column in columns))
        lines += [f"{group:44} " + " ".join(f"{total[column]:9.1f}" for column in columns)
                  for group, total in ranked[:top]]
    total = collections.Counter()
    for row in rows:
        total.update({column: row[column] for column in columns})
    lines.append(f"\n{'all':44} " + " ".join(f"{total[column]:9.1f}" for column in columns))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the JSON lines a run with -p bench.suite_cpu wrote")
    parser.add_argument("--top", type=int, default=30, help="modules to list")
    args = parser.parse_args()
    print(summarise(args.path, args.top))


if __name__ == "__main__":
    main()
