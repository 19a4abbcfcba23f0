"""client/fitprobe_client/client.py against a real server: typed errors, event streams that survive a drop."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable

import pytest

import fitprobe_client.client
from fitprobe_client.client import BadRequest, FitprobeClient, NotFound, Unreachable, base_url
from tests.api.conftest import FAST_JOB, free_port


class CuttingProxy:
    """A TCP proxy in front of the real server that cuts event streams, as a proxy restart or a flaky
    network does: the n-th event stream is closed after `events_before_cut(n)` whole events plus a few
    bytes of the next one (None: never cut). Everything else passes through untouched."""

    def __init__(self, upstream_url: str, events_before_cut: Callable[[int], int | None]) -> None:
        host, port = upstream_url.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.events_before_cut = events_before_cut
        self.event_streams = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            downstream, _ = self.listener.accept()
            threading.Thread(target=self._pipe, args=(downstream,), daemon=True).start()

    def _pipe(self, downstream: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        cut_after: int | None = None
        answered = b""
        with downstream, upstream:
            while True:
                readable, _, _ = select.select([downstream, upstream], [], [], 60)
                data = readable[0].recv(65536) if readable else b""
                if not data:
                    return
                if readable[0] is downstream:
                    if b"/events" in data:
                        cut_after = self.events_before_cut(self.event_streams)
                        self.event_streams += 1
                        answered = b""
                    upstream.sendall(data)
                    continue
                if cut_after is None:
                    downstream.sendall(data)
                    continue
                before, answered = len(answered), answered + data
                end = -1
                for _ in range(cut_after):
                    end = answered.find(b"\n\n", end + 1)
                    if end < 0:
                        break
                if cut_after and end < 0:
                    downstream.sendall(data)
                    continue
                cut_at = min(len(answered), end + 2 + 10) if cut_after else 0  # 10 bytes of a partial event
                downstream.sendall(answered[before:cut_at])
                return


@pytest.fixture(scope="module")
def finished_job(server) -> dict:
    with FitprobeClient(server.url) as client:
        job = client.submit({**FAST_JOB, "reuse": False})
        return client.wait(job["id"], timeout_s=180)


def ids(events: list[dict]) -> list[int | None]:
    return [event["id"] for event in events]


def test_server_addresses_without_a_scheme_mean_http():
    assert base_url("localhost:8000") == "http://localhost:8000"
    assert base_url("https://fitprobe.example.com/") == "https://fitprobe.example.com"


def test_wait_follows_the_events_to_the_finished_job(server, finished_job):
    assert finished_job["status"] == "succeeded" and finished_job["verification"]["passed"]
    seen: list[dict] = []
    with FitprobeClient(server.url) as client:
        job = client.submit({**FAST_JOB, "effective_batch": 12, "reuse": False})
        done = client.wait(job["id"], timeout_s=180, on_event=seen.append)
    assert done["status"] == "succeeded"
    assert [e["micro_batch"] for e in seen if e["type"] == "trial"] == [t["micro_batch"] for t in done["trials"]]
    assert {"probing", "verifying"} <= {e["phase"] for e in seen if e["type"] == "phase"}


def test_events_resume_after_the_last_id_without_repeats(server, finished_job):
    with FitprobeClient(server.url) as client:
        everything = list(client.events(finished_job["id"]))
        stream = client.events(finished_job["id"])
        first = [next(stream) for _ in range(3)]
        stream.close()  # the caller hangs up
        rest = list(client.events(finished_job["id"], last_event_id=first[-1]["id"]))
    assert everything[-1] == {"type": "end", "status": "succeeded", "id": None}
    assert ids(first + rest) == ids(everything) and len(set(ids(everything))) == len(everything)
    assert first + rest == everything


def test_events_reconnect_by_themselves_when_the_connection_drops(server, finished_job):
    with FitprobeClient(server.url) as direct:
        everything = list(direct.events(finished_job["id"]))
    proxy = CuttingProxy(server.url, lambda stream: 3 if stream == 0 else None)
    with FitprobeClient(proxy.url) as client:
        through_a_cut = list(client.events(finished_job["id"]))
    assert proxy.event_streams == 2, "the first stream was cut and reopened once"
    assert through_a_cut == everything, "no event lost, none repeated, the partial one not delivered"


def test_wait_falls_back_to_polling_when_no_event_stream_gets_through(server, finished_job, monkeypatch):
    monkeypatch.setattr(fitprobe_client.client, "RECONNECT_BACKOFF_S", (0.01,))
    proxy = CuttingProxy(server.url, lambda stream: 0)
    seen: list[dict] = []
    with FitprobeClient(proxy.url) as client:
        job = client.wait(finished_job["id"], timeout_s=60, on_event=seen.append)
    assert proxy.event_streams == fitprobe_client.client.RECONNECT_ATTEMPTS + 1
    assert job == finished_job
    assert [e["micro_batch"] for e in seen if e["type"] == "trial"] == [t["micro_batch"] for t in job["trials"]]


def test_errors_are_typed_with_the_servers_detail(server):
    with FitprobeClient(server.url) as client:
        with pytest.raises(NotFound, match="no probe with id"):
            client.get("no-such-probe")
        with pytest.raises(BadRequest) as refused:
            client.submit({**FAST_JOB, "seq_len": 0})
        assert refused.value.status_code == 422 and "seq_len" in refused.value.detail
    with FitprobeClient(f"127.0.0.1:{free_port()}", timeout_s=5) as nowhere, \
            pytest.raises(Unreachable, match="unreachable"):
        nowhere.submit(FAST_JOB)

