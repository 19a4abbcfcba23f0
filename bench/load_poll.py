"""Load benchmark: 200 concurrent clients poll GET /v1/probes/{id} while a probe runs.

Loopback only, bounded in requests and seconds. Starts its own server unless --server is given.
    python bench/load_poll.py --clients 200 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.api.conftest import SLOW_JOB, start_server  # the same real-server helper


async def poller(client: httpx.AsyncClient, path: str, stop_at: float, budget: list[int], latencies: list[float],
                 errors: list[int]) -> None:
    while time.monotonic() < stop_at and budget[0] > 0:
        budget[0] -= 1
        started = time.perf_counter()
        try:
            response = await client.get(path)
            if response.status_code != 200:
                errors.append(response.status_code)
        except httpx.HTTPError:
            errors.append(0)
        latencies.append(time.perf_counter() - started)


async def run(url: str, clients: int, seconds: float, max_requests: int) -> dict:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        job = (await client.post("/v1/probes", json=SLOW_JOB)).json()
        latencies: list[float] = []
        errors: list[int] = []
        budget = [max_requests]
        started = time.monotonic()
        await asyncio.gather(*(poller(client, f"/v1/probes/{job['id']}", started + seconds, budget, latencies, errors)
                               for _ in range(clients)))
        elapsed = time.monotonic() - started
        status = (await client.get(f"/v1/probes/{job['id']}")).json()["status"]
        await client.delete(f"/v1/probes/{job['id']}")
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "elapsed_s": round(elapsed, 2),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 1), "job_status_during": status}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="an already running server (loopback); default: start one")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-requests", type=int, default=50_000)
    args = parser.parse_args()
    server = None
    if args.server is None:
        server = start_server(Path(tempfile.mkdtemp()) / "data")
    try:
        result = asyncio.run(run(args.server or server.url, args.clients, args.seconds, args.max_requests))
    finally:
        if server:
            server.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
