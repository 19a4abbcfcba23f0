"""FITPROBE_EXECUTOR=ray against a real Ray cluster and a real uvicorn server.

The test process starts a local Ray cluster (2 CPUs, and a custom resource `fitprobe_device: 2`
standing in for two GPUs) and the server joins it as a second driver, as a service joins a
cluster someone else runs. The tests then only talk HTTP to the server, and look at the Ray
worker processes from outside, as an operator would.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from fitprobe_client.client import FitprobeClient
from tests.api.conftest import SLOW_JOB, Server, start_server, wait_for

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402 - a local multi-node cluster, for tests (ray's own)
pytestmark = pytest.mark.slow

QUICK_JOB = {"model": "builtin:gpt-nano", "seq_len": 32, "precision": "fp32", "capacity_bytes": 16 << 20, "reuse": False}
TWO_DEVICE_JOB = {**QUICK_JOB, "effective_batch": 8, "num_devices": 2}
STAND_IN_DEVICES = 2


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    # Ray's workers must import `app` from this checkout, whichever fitprobe the interpreter has installed
    checkout = str(Path(__file__).resolve().parents[2])
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, old_path]))
    # ray.init swaps in its own SIGTERM/SIGINT handlers: pytest's Ctrl-C must keep working after this module
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 2, "resources": {"fitprobe_device": STAND_IN_DEVICES}, "include_dashboard": False})
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()  # stops the nodes this process started, and only them
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


@pytest.fixture(scope="module")
def ray_server(ray_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("ray-service") / "data", executor="ray",
                           ray_address=ray_cluster.address)
    yield running
    running.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended, its parent not yet reaped it
    except FileNotFoundError:
        return False


def _eventually(check: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{check.__name__} still false after {timeout_s:.0f}s"
        time.sleep(0.2)


def _devices_free() -> bool:
    return ray.available_resources().get("fitprobe_device", 0) == STAND_IN_DEVICES


def _placed(job: dict) -> bool:
    return job["worker_pid"] is not None


def test_two_jobs_run_as_ray_tasks_at_the_same_time_on_the_two_stand_in_devices(ray_server: Server) -> None:
    with ray_server.client() as client:
        ids = [client.post("/v1/probes", json={**QUICK_JOB, "seed": seed}).json()["id"] for seed in (1, 2)]
        jobs = [wait_for(client, job_id, ("succeeded", "failed", "cancelled")) for job_id in ids]
        assert [job["status"] for job in jobs] == ["succeeded", "succeeded"], [job["error"] for job in jobs]
        placements = [job["report"]["placement"] for job in jobs]
        node_id = ray.get_runtime_context().get_node_id()
        assert all(p["executor"] == "ray" and p["node_id"] == node_id and p["node_ip"] for p in placements)
        assert placements[0]["pid"] != placements[1]["pid"]  # one Ray worker process per job
        # each task held one of the two stand-in devices, and they ran at once: their intervals overlap
        assert max(p["started_at"] for p in placements) < min(p["finished_at"] for p in placements)
        for job in jobs:
            phases = [e["phase"] for e in FitprobeClient(ray_server.url).events(job["id"]) if e["type"] == "phase"]
            assert phases[:2] == ["scheduling", "placed"] and "probing" in phases
            assert job["report"]["search"]["max_micro_batch"] > 0
            assert datetime.fromisoformat(job["finished_at"]) > datetime.fromisoformat(job["started_at"])
    _eventually(_devices_free)


def test_cancel_ends_the_ray_task_and_frees_its_device(ray_server: Server) -> None:
    with ray_server.client() as client:
        job_id = client.post("/v1/probes", json=SLOW_JOB).json()["id"]
        pid = wait_for(client, job_id, ("running",), predicate=_placed)["worker_pid"]
        assert _alive(pid)
        cancelled = client.delete(f"/v1/probes/{job_id}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        _eventually(lambda: not _alive(pid), timeout_s=30)  # Ray's force-cancel killed the worker process
        _eventually(_devices_free, timeout_s=30)
        job = client.get(f"/v1/probes/{job_id}").json()
        assert job["status"] == "cancelled" and job["error"] == "cancelled by request" and job["report"] is None


def test_a_killed_ray_worker_fails_its_job_with_the_reason_and_the_next_job_runs(ray_server: Server) -> None:
    with ray_server.client() as client:
        job_id = client.post("/v1/probes", json=SLOW_JOB).json()["id"]
        job = wait_for(client, job_id, ("running",), predicate=lambda j: _placed(j) and j["phase"] == "probing")
        os.kill(job["worker_pid"], signal.SIGKILL)
        failed = wait_for(client, job_id, ("failed", "succeeded", "cancelled"), timeout_s=60)
        assert failed["status"] == "failed"
        assert f"Ray worker running this job died (worker pid {job['worker_pid']} on node" in failed["error"]
        assert "WorkerCrashedError" in failed["error"] and failed["worker_pid"] is None
        _eventually(_devices_free, timeout_s=30)
        after = client.post("/v1/probes", json={**QUICK_JOB, "seed": 3}).json()["id"]
        assert wait_for(client, after, ("succeeded", "failed"))["status"] == "succeeded"


def test_a_two_device_job_holds_both_stand_in_devices_on_one_node_and_verifies_on_them(ray_server: Server) -> None:
    with ray_server.client() as client:
        job_id = client.post("/v1/probes", json=TWO_DEVICE_JOB).json()["id"]
        wait_for(client, job_id, ("running",), predicate=_placed)

        held_both = []

        def both_held_or_done() -> bool:
            if ray.available_resources().get("fitprobe_device", 0) == 0:
                held_both.append(True)
                return True
            return client.get(f"/v1/probes/{job_id}").json()["status"] != "running"

        _eventually(both_held_or_done)
        done = wait_for(client, job_id, ("succeeded", "failed"), timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    assert held_both, "the job finished before it was seen holding both devices"
    assert done["verification"]["passed"] and done["verification"]["num_devices"] == 2
    assert done["report"]["placement"]["node_id"] == ray.get_runtime_context().get_node_id()
    _eventually(_devices_free)


def test_cancel_during_a_two_device_verification_leaves_no_process_behind(ray_server: Server) -> None:
    with ray_server.client() as client:
        job_id = client.post("/v1/probes", json={**TWO_DEVICE_JOB, "effective_batch": 64}).json()["id"]
        running = wait_for(client, job_id, ("running", "succeeded", "failed"), timeout_s=300,
                           predicate=lambda j: j["phase"] in ("verifying", "done", "failed"))
        assert running["phase"] == "verifying", "the verification ended before the test could cancel it"
        worker = psutil.Process(running["worker_pid"])
        _eventually(lambda: bool(worker.children(recursive=True)), timeout_s=30)  # the verification's processes
        ranks = worker.children(recursive=True)
        assert client.delete(f"/v1/probes/{job_id}").status_code == 200
    _eventually(lambda: not any(_alive(p.pid) for p in [worker, *ranks]), timeout_s=30)
    _eventually(_devices_free, timeout_s=30)


def test_a_job_needing_more_devices_than_one_node_has_is_refused_with_the_reason(ray_server: Server) -> None:
    with ray_server.client() as client:
        response = client.post("/v1/probes", json={**QUICK_JOB, "effective_batch": 24, "num_devices": 3})
    assert response.status_code == 422
    assert "num_devices must be ≤ 2" in response.json()["detail"]
    assert "fitprobe_device on one node of the Ray cluster" in response.json()["detail"]


def test_a_job_whose_node_dies_fails_with_the_reason(ray_cluster: Cluster, ray_server: Server) -> None:
    """A node with 3 stand-in devices joins; a job needing 3 can only run there, with all 3 on it."""
    node = ray_cluster.add_node(num_cpus=1, resources={"fitprobe_device": 3})
    three_devices = {**SLOW_JOB, "effective_batch": 24, "num_devices": 3}
    with ray_server.client() as client:
        submitted = []

        def accepted() -> bool:  # the service re-reads the cluster's nodes every few seconds
            response = client.post("/v1/probes", json=three_devices)
            submitted.append(response.json())
            return response.status_code == 202

        _eventually(accepted, timeout_s=30)
        job = wait_for(client, submitted[-1]["id"], ("running",), predicate=_placed)
        placed = next(e for e in FitprobeClient(ray_server.url).events(job["id"]) if e.get("phase") == "placed")
        assert placed["node_id"] == node.node_id
        ray_cluster.remove_node(node, allow_graceful=False)
        failed = wait_for(client, job["id"], ("failed", "succeeded", "cancelled"), timeout_s=60)
    assert failed["status"] == "failed"
    assert "died" in failed["error"] and ("NodeDiedError" in failed["error"] or "WorkerCrashedError" in failed["error"])
    assert f"on node {placed['node_ip']}" in failed["error"]
