"""The one HTTP client of the fitprobe service: `fitprobe preflight` uses it, and so can any Python user.

It only needs httpx (no torch, no FastAPI): it ships alone as the `fitprobe-client` distribution
(client/pyproject.toml), so a CI job installs it in seconds and talks to a server without building
anything. Three things make it more than `httpx.post`:

- Errors come back as the exception a caller can act on: `BadRequest` (the server refused the
  request; `detail` says what to change), `NotFound`, `Unreachable` (no answer at all), `ServerError`
  (answered 5xx or 429: try again later), `TimedOut` (`wait` ran out of time; the job may still run).
- `events()` follows the Server-Sent Events stream and, when a proxy or a server restart drops the
  connection, reconnects with `Last-Event-ID`, so a caller sees each event exactly once.
- `wait()` follows the events and falls back to polling when the stream cannot be had, so a
  pipeline behind a proxy that buffers SSE still gets its answer.

`hf:<path>` model references name a file on the machine running the client; the server refuses them
(it must not read its own files on a request's say-so), so `submit()` sends that file's config inline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from fitprobe_client.status import TERMINAL
# the server sends a keep-alive comment every 10 s on a quiet stream: a read that waits longer than
# this has lost its connection, whatever the per-request timeout is
SSE_READ_TIMEOUT_S = 30.0
RECONNECT_ATTEMPTS = 5
RECONNECT_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 4.0)
POLL_INTERVAL_S = 1.0


class FitprobeError(Exception):
    """Anything the client could not do; the message says what happened and what to change."""


class BadRequest(FitprobeError):
    """The server refused the request (4xx): `detail` is its message naming the field and the fix."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class NotFound(BadRequest):
    """No probe with that id on this server (404)."""


class ServerError(FitprobeError):
    """The server answered but could not serve (5xx, or 429 with its queue full): retry later."""

    def __init__(self, status_code: int, detail: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.retry_after_s = retry_after_s


class Unreachable(FitprobeError):
    """No answer: connection refused, name not resolved, or the request timed out."""


class TimedOut(FitprobeError):
    """`wait()` ran out of time; `job` is the last state seen (the probe itself may still be running)."""

    def __init__(self, message: str, job: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.job = job


class ConfigFileError(FitprobeError, ValueError):
    """An `hf:` config file that cannot be sent: missing, not JSON, or not a JSON object."""


class _DeadlinePassed(Exception):
    """Internal: `wait()`'s deadline passed while a stream was open."""


def base_url(server: str) -> str:
    """`localhost:8000` → `http://localhost:8000`: a CI variable rarely carries the scheme."""
    server = server.strip().rstrip("/")
    return server if "://" in server else f"http://{server}"


def read_hf_config(ref: str) -> dict[str, Any]:
    """`hf:<config.json or a directory holding one>` → the config dict to send inline."""
    path = Path(ref.removeprefix("hf:")).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigFileError(f"model {ref}: no file {str(path)!r}; give a config.json or a directory holding one")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"model {ref}: {str(path)!r} is not JSON ({exc})") from None
    except OSError as exc:
        raise ConfigFileError(f"model {ref}: cannot read {str(path)!r} ({exc.strerror})") from None
    if not isinstance(config, dict):
        raise ConfigFileError(f"model {ref}: {str(path)!r} holds a JSON {type(config).__name__}; "
                              "a transformers config is a JSON object")
    return config


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else (response.text.strip()[:500] or response.reason_phrase)


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    detail = _detail(response)
    if response.status_code == 404:
        raise NotFound(404, detail)
    if response.status_code == 429 or response.status_code >= 500:
        retry_after = response.headers.get("retry-after")
        raise ServerError(response.status_code, detail,
                          float(retry_after) if retry_after and retry_after.isdigit() else None)
    raise BadRequest(response.status_code, detail)


def _events_from_lines(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """SSE text → one dict per event: its data, plus `id` (int or None) and `type` (the event name).

    A partial event (the connection dropped before its blank line) is never yielded: resuming from
    the last complete event's id sends it again whole.
    """
    event_id: str | None = None
    name = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                payload = json.loads("\n".join(data))
                payload = payload if isinstance(payload, dict) else {"data": payload}
                yield {**payload, "id": int(event_id) if event_id else None, "type": name}
            event_id, name, data = None, "message", []
            continue
        if line.startswith(":"):
            continue  # keep-alive comment
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            event_id = value
        elif field == "event":
            name = value
        elif field == "data":
            data.append(value)


class FitprobeClient:
    """Submit, follow, cancel and export probes on one fitprobe server.

    `timeout_s` bounds each request (connect and read); waiting for a probe to finish is `wait()`'s
    own `timeout_s`. Use it as a context manager, or call `close()`, to release the connections.
    """

    def __init__(self, server: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.server = base_url(server)
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout_s)

    def __enter__(self) -> FitprobeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"fitprobe server {self.server} unreachable: {exc or type(exc).__name__}") from exc
        _raise_for_status(response)
        return response

    def submit(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """POST the spec (`reuse: false` forces a fresh probe); returns the job, maybe already cached."""
        body = dict(spec)
        if isinstance(body.get("model"), str) and body["model"].startswith("hf:"):
            body["model"] = read_hf_config(body["model"])
        return self._request("POST", "/v1/probes", json=body).json()

    def get(self, job_id: str) -> dict[str, Any]:
        """The job now: status, phase, trials so far, plan, verification, error."""
        return self._request("GET", f"/v1/probes/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running probe (the server kills its process); 409 → BadRequest if finished."""
        return self._request("DELETE", f"/v1/probes/{job_id}").json()

    def config(self, job_id: str, fmt: str) -> Any:
        """The plan as a framework's config (hf, accelerate, deepspeed, lightning, axolotl, torchtune).

        Parsed JSON when the server answers JSON, the text otherwise (YAML formats stay as written).
        """
        response = self._request("GET", f"/v1/probes/{job_id}/config", params={"format": fmt})
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    def events(self, job_id: str, last_event_id: int | None = None) -> Iterator[dict[str, Any]]:
        """Each event of the job once, in order, ending with `{"type": "end", "status": ...}`.

        Resumes after `last_event_id` when given. A dropped connection is reopened with the last
        id seen; `Unreachable` after RECONNECT_ATTEMPTS reconnections in a row brought nothing new.
        """
        yield from self._follow(job_id, last_event_id, deadline_s=None)

    def _follow(self, job_id: str, last_event_id: int | None,
                deadline_s: float | None) -> Iterator[dict[str, Any]]:
        failures = 0
        timeout = httpx.Timeout(self.timeout_s, read=max(self.timeout_s, SSE_READ_TIMEOUT_S))
        while True:
            headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
            try:
                with self._http.stream("GET", f"/v1/probes/{job_id}/events", headers=headers,
                                       timeout=timeout) as response:
                    if response.status_code >= 400:
                        response.read()
                        _raise_for_status(response)
                    for event in _events_from_lines(self._lines(response, deadline_s)):
                        failures = 0
                        if event["id"] is not None:
                            last_event_id = event["id"]
                        yield event
                        if event["type"] == "end":
                            return
                reason = "the server closed the stream before the job ended"
            except (httpx.TransportError, ServerError) as exc:
                reason = str(exc) or type(exc).__name__
            failures += 1
            if failures > RECONNECT_ATTEMPTS:
                raise Unreachable(f"lost the event stream of probe {job_id} on {self.server} "
                                  f"{failures} times in a row: {reason}")
            time.sleep(RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S)) - 1])

    def _lines(self, response: httpx.Response, deadline_s: float | None) -> Iterator[str]:
        # keep-alive comments arrive every 10 s, so checking here bounds how late a deadline is noticed
        for line in response.iter_lines():
            if deadline_s is not None and time.monotonic() > deadline_s:
                raise _DeadlinePassed
            yield line

    def wait(self, job_id: str, timeout_s: float,
             on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Follow the job until it ends and return it; `on_event` sees each phase and trial.

        Falls back to polling when the event stream cannot be had. Raises `TimedOut` (with the last
        job state) after `timeout_s`, noticed within about 10 s on a stream; the job is left running.
        """
        deadline_s = time.monotonic() + timeout_s
        notify = on_event or (lambda _event: None)
        trials_seen = 0
        try:
            for event in self._follow(job_id, None, deadline_s):
                trials_seen += event["type"] == "trial"
                if event["type"] != "end":
                    notify(event)
            return self.get(job_id)
        except _DeadlinePassed:
            job = self.get(job_id)
            if job["status"] in TERMINAL:
                return job
            raise TimedOut(f"probe {job_id} still {job['status']} after {timeout_s:g} s", job) from None
        except Unreachable:
            return self._poll(job_id, deadline_s, timeout_s, notify, trials_seen)

    def _poll(self, job_id: str, deadline_s: float, timeout_s: float,
              notify: Callable[[dict[str, Any]], None], seen_trials: int) -> dict[str, Any]:
        """The stream is gone: read the job every POLL_INTERVAL_S and report what changed as events."""
        phase = None
        while True:
            job = self.get(job_id)
            for trial in job["trials"][seen_trials:]:
                notify({**trial, "type": "trial"})
            seen_trials = len(job["trials"])
            if job["phase"] != phase:
                phase = job["phase"]
                notify({"type": "phase", "phase": phase})
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline_s:
                raise TimedOut(f"probe {job_id} still {job['status']} after {timeout_s:g} s", job)
            time.sleep(POLL_INTERVAL_S)
