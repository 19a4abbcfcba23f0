"""Several replicas on one real PostgreSQL: each job is claimed once, and a replica that dies leaves its
jobs to another within the lease. The store's lease rules first, then real uvicorn replicas."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import sqlalchemy as sa

from fitprobe.app import migrate
from fitprobe.app.store import Store, events
from fitprobe_client.status import JobStatus
from tests.api.conftest import SLOW_JOB, Server, start_server, wait_for
from tests.postgres import create_database

NO_VERIFY_JOB = {"model": "builtin:gpt-nano", "seq_len": 32, "precision": "fp32", "capacity_bytes": 16 << 20, "reuse": False}
LEASE_S = 3.0


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fitprobe.db'}"
    return request.getfixturevalue("postgres_url")


def _replicas(url: str, count: int, lease_s: float) -> list[Store]:
    stores = [Store(url, owner=f"replica-{i}", lease_s=lease_s) for i in range(count)]
    migrate.upgrade(stores[0].engine)
    return stores


def test_a_job_whose_lease_runs_out_goes_to_another_replica_and_the_first_can_no_longer_finish_it(database_url):
    first, second = _replicas(database_url, 2, lease_s=0.5)
    job = first.create({"model": "builtin:gpt-nano"}, "fp", max_queued=10)
    assert first.claim_next("cpu")["owner"] == "replica-0"
    assert first.heartbeat(job["id"])
    time.sleep(0.6)  # no heartbeat: replica-0 is gone as far as anyone can tell
    taken = second.claim_next("cpu")  # a claim first re-queues abandoned jobs
    assert (taken["id"], taken["owner"], taken["attempts"]) == (job["id"], "replica-1", 2)
    assert not first.heartbeat(job["id"]) and not first.succeed(job["id"], {"late": True})
    time.sleep(0.6)
    assert second.requeue_abandoned() == (0, 0)  # a replica never gives up its own jobs: it is alive
    assert first.requeue_abandoned() == (0, 1)  # interrupted on both runs: failed, not re-run forever
    failed = first.get(job["id"])
    assert failed["status"] == JobStatus.FAILED and failed["error"].startswith("interrupted")


def test_a_restart_recovers_at_once_the_jobs_of_a_dead_replica_on_this_host_and_leaves_live_ones(tmp_path):
    url = f"sqlite:///{tmp_path / 'fitprobe.db'}"
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    owners = {"dead": f"{host}-{dead.pid}-0000dead", "live": f"{host}-{os.getppid()}-0000live",
              "elsewhere": f"another-host-{dead.pid}-00000far"}
    for name, owner in owners.items():
        store = _replicas(url, 1, lease_s=60)[0]
        store.owner = owner
        store.create({"model": "builtin:gpt-nano"}, name, max_queued=10)
        assert store.claim_next("cpu")["fingerprint"] == name
    restarted = Store(url, lease_s=60)
    assert restarted.recover() == (1, 0)  # no need to wait out the dead one's lease
    by_name = {job["fingerprint"]: job["status"] for job in restarted.list(None, 10, 0)[0]}
    assert by_name == {"dead": JobStatus.QUEUED, "live": JobStatus.RUNNING, "elsewhere": JobStatus.RUNNING}


def test_replicas_claiming_at_once_take_each_job_exactly_once(postgres_url):
    stores = _replicas(postgres_url, 6, lease_s=60)
    submitted = {stores[0].create({"n": n}, f"fp{n}", max_queued=100)["id"] for n in range(40)}
    claims: list[tuple[str, str]] = []
    start = threading.Barrier(len(stores))

    def claim_all(store: Store) -> None:
        start.wait()
        while (job := store.claim_next("cpu")) is not None:
            claims.append((job["id"], store.owner))

    with ThreadPoolExecutor(len(stores)) as pool:
        list(pool.map(claim_all, stores))
    assert sorted(job_id for job_id, _ in claims) == sorted(submitted)  # each once, none left queued
    assert len({owner for _, owner in claims}) > 1


# ---- real replicas ---------------------------------------------------------------------------------
def _start_replicas(tmp_path, url: str, count: int = 2) -> list[Server]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda i: start_server(tmp_path / f"replica{i}", database_url=url,
                                                    lease_s=str(LEASE_S), max_jobs_per_client="32"),
                                       range(count)))


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory, postgres) -> Iterator[tuple[list[Server], str]]:
    """Two replicas on a database of their own, shared by the tests that leave both alive."""
    url = create_database(postgres)
    replicas = _start_replicas(tmp_path_factory.mktemp("replicas"), url)
    yield replicas, url
    for replica in replicas:
        replica.stop()


def _first_phases(url: str) -> Counter:
    """How many times each job began a run: its first phase event, once per run."""
    with sa.create_engine(url).connect() as conn:
        rows = conn.execute(sa.select(events.c.job_id, events.c.data)).all()
    return Counter(job_id for job_id, data in rows if json.loads(data).get("phase") == "building_model")


# Three jobs on two replicas that run one job at a time: each replica claims one at once, and one of them
# claims the third after its first, so both claim paths (idle and just finished) meet on the one queue. The
# race itself (many claimers, many jobs) is test_replicas_claiming_at_once_take_each_job_exactly_once's.
REPLICA_JOBS = 3


@pytest.mark.slow  # 20-60 s on the shared 2-core machine (+9 s to start both replicas): each job process imports torch
def test_two_replicas_run_each_job_exactly_once(two_replicas):
    replicas, url = two_replicas
    clients = [replica.client() for replica in replicas]
    ids = [clients[n % 2].post("/v1/probes", json={**NO_VERIFY_JOB, "seed": n}).json()["id"]
           for n in range(REPLICA_JOBS)]
    done = [wait_for(clients[n % 2], job_id, ("succeeded", "failed"), timeout_s=400) for n, job_id in enumerate(ids)]
    assert [job["status"] for job in done] == ["succeeded"] * REPLICA_JOBS, [job["error"] for job in done]
    assert [job["attempts"] for job in done] == [1] * REPLICA_JOBS  # every claim counts an attempt
    assert _first_phases(url) == Counter({job_id: 1 for job_id in ids})  # and every run announces itself
    owners = Counter(job["owner"] for job in done)
    assert len(owners) == 2, owners  # both replicas took jobs from the one queue


@pytest.mark.slow  # 17-53 s: two replicas start, a job starts, its replica dies, the job runs again
def test_kill_9_of_a_replica_mid_job_lets_the_other_rerun_it_within_the_lease(tmp_path, postgres_url):
    replicas = _start_replicas(tmp_path, postgres_url)
    try:
        with replicas[0].client() as client:
            # killed while its process still imports torch: seconds before it could finish
            job = client.post("/v1/probes", json={**NO_VERIFY_JOB, "seq_len": 128}).json()
            running = wait_for(client, job["id"], ("running",), predicate=lambda j: j["worker_pid"])
        doomed, survivor = sorted(replicas, key=lambda r: r.process.pid != _pid_of(running["owner"]))
        doomed.kill()
        killed_at = time.monotonic()
        with survivor.client() as client:
            rerun = wait_for(client, job["id"], ("running", "succeeded", "failed"), timeout_s=60,
                             predicate=lambda j: j["attempts"] == 2)
            # the lease runs out within LEASE_S of the last heartbeat, the survivor looks every LEASE_S / 2
            assert time.monotonic() - killed_at < 2 * LEASE_S + 3
            assert _pid_of(rerun["owner"]) == survivor.process.pid
            done = wait_for(client, job["id"], ("succeeded", "failed"), timeout_s=300)
        assert (done["status"], done["attempts"]) == ("succeeded", 2), done["error"]
    finally:
        for replica in replicas:
            replica.stop()


@pytest.mark.slow  # 2-17 s, on the replicas the three-job test started
def test_a_cancel_through_one_replica_stops_the_job_running_on_the_other(two_replicas):
    replicas, _ = two_replicas
    with replicas[0].client() as client:
        job = client.post("/v1/probes", json=SLOW_JOB).json()
        running = wait_for(client, job["id"], ("running",), predicate=lambda j: j["worker_pid"])
    other = next(replica for replica in replicas if replica.process.pid != _pid_of(running["owner"]))
    with other.client() as client:
        assert client.delete(f"/v1/probes/{job['id']}").json()["status"] == "cancelled"
    # the owner's next heartbeat (every LEASE_S / 3) finds the job no longer its own and kills the process
    deadline = time.monotonic() + LEASE_S + 5
    while _alive(running["worker_pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(running["worker_pid"])


def _pid_of(owner: str) -> int:
    """The pid in a replica id (hostname-pid-random)."""
    return int(owner.rsplit("-", 2)[1])


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
