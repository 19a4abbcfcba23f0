"""The model a request names, built on the meta device in a process the service can kill: its true size.

Arithmetic on a config (probe/models/bounds.py) reads the fields it knows; a bart `decoder_layers`, a mamba
`expand`, an opt `word_embed_proj_dim` or a nested `text_config` are built just the same, and were
let through at 10⁹ or 10¹³ parameters. So the door also builds every inline or Hub config on the meta
device (no memory) and counts what was built, whatever the fields are called. Building costs time in
the layer count (bart at 3,000 layers: minutes), so it happens in one long-lived sizing process with
transformers already imported, and a build that runs past FITPROBE_MODEL_BUILD_TIMEOUT_S kills that
process (a new one starts for the next request) and refuses the request. The sizing process is forked
from the fork server the jobs are forked from (app/executors/forked.py), which imported torch and
transformers once for both: a new one starts in a fraction of a second, and dies with the service.

The server process reads configs with transformers too (probe/models/reference.py: `check_reference`), and its
first import took 7 s at the door; so the sizer imports it here as well, beside serving, and the door
waits for that import (`ready`) rather than importing it a second time half-way (a lazy module
imported from two threads at once answered "cannot import name").

One thread owns the process: it takes requests in arrival order and is the only thread that starts
the process. At most `max_waiting` requests wait for it, and at most
`max_per_client` of one client's (a build can take the whole timeout: nine slow configs from one client held
the process for four minutes, and every other client's config was a 429); more are a 429.

The server process itself never runs a config's constructor for a config sized here (app/door.py): the
constructors run loops over fields no size limit names, and here a timeout ends them and a memory cap
(MEMORY_BYTES) stops their allocations.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import queue
import resource
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from fitprobe.app.executors.forked import start_forked
from fitprobe.probe.spec import SpecError

log = logging.getLogger("fitprobe.sizer")
STOP = None  # put on the queue: the owner thread ends the process and returns
STARTUP_S = 120.0  # importing torch and transformers: 7 s on the 2-core test host, more under load


MEMORY_BYTES = 4 << 30  # beyond its imports: a meta build holds modules, no weights (a 1,024-layer model: ~0.3 GB)


def _bound_memory(extra_bytes: int) -> None:
    """Cap this process's data (heap and private mappings) at what it holds now plus `extra_bytes`.

    A config's constructor can allocate in its own loops (step3p7's `num_nextn_predict_layers` makes a list of
    that many names): 10⁹ is 8 GB in two seconds, well inside the build timeout. Past the cap an allocation
    raises MemoryError, which answers that request's build as failed; the process keeps serving."""
    try:
        with open("/proc/self/status") as status:
            data_kib = next(int(line.split()[1]) for line in status if line.startswith("VmData:"))
    except (OSError, StopIteration, ValueError):  # not Linux: the build timeout still bounds the time
        return
    limit = data_kib * 1024 + extra_bytes
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


class SizerBusy(Exception):
    """Too many requests wait for the sizing process: retry later."""


def serve_sizes(connection: Connection) -> None:
    """The sizing process: (parameters, context) or a refusal for each spec it is sent, until its parent
    closes the connection. Imports transformers (the fork server has), before the first request."""
    import transformers  # noqa: F401 - the import is most of a first build's time

    from fitprobe.probe.models.load import counted_on_meta
    from fitprobe.probe.spec import ProbeSpec

    _bound_memory(MEMORY_BYTES)

    connection.send(("ready",))
    while True:
        try:
            spec = connection.recv()
        except EOFError:
            return
        try:
            connection.send(("ok", *counted_on_meta(ProbeSpec.model_validate(spec))))
        except SpecError as exc:
            connection.send(("refused", str(exc)))
        except Exception as exc:  # noqa: BLE001 - a config that breaks the builder is the request's problem
            connection.send(("refused", f"model: building it failed ({type(exc).__name__}); check the config"))


def _import_transformers() -> None:
    """Import transformers now, at start-up, in the thread that starts the service (about a second).

    A first request would otherwise pay the import at the door. Not in a background thread: an import there
    races every other import in the process, and importlib's deadlock avoidance then hands one thread a
    partially initialised module ("cannot import name CONFIG_MAPPING", "... TrainingArguments").
    """
    try:
        importlib.import_module("transformers")
    except ImportError:  # the hf extra is optional: builtin models need none
        pass


class Sizer:
    """Counts a spec's model on the meta device in the sizing process, within `timeout_s` per build."""

    def __init__(self, timeout_s: float, max_waiting: int = 8, max_per_client: int = 2) -> None:
        self.timeout_s = timeout_s
        self.max_waiting, self.max_per_client = max_waiting, max_per_client
        self._by_client: dict[str, int] = {}  # a client's configs waiting or being built
        self._lock = threading.Lock()
        self._requests: queue.Queue[tuple[dict[str, Any], Future[tuple[int, int | None]]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._own, name="fitprobe-sizer", daemon=True)
        self._thread.start()
        _import_transformers()

    def count(self, spec: dict[str, Any], client: str = "") -> tuple[int, int | None]:
        """(parameters, context) of the spec's model; SpecError when it cannot be built in time."""
        with self._lock:
            if self._requests.qsize() >= self.max_waiting:
                raise SizerBusy(f"{self.max_waiting} model configs already wait to be sized")
            if self._by_client.get(client, 0) >= self.max_per_client:
                raise SizerBusy(f"this client already has {self.max_per_client} model configs waiting to be sized, "
                                "its limit; wait for their answers")
            self._by_client[client] = self._by_client.get(client, 0) + 1
        try:
            answer: Future[tuple[int, int | None]] = Future()
            self._requests.put((spec, answer))
            return answer.result()
        finally:
            with self._lock:
                left = self._by_client.pop(client) - 1
                if left:
                    self._by_client[client] = left

    def stop(self) -> None:
        self._requests.put(STOP)
        self._thread.join(timeout=10)

    def _start(self) -> tuple[Any, Connection]:
        """A sizing process that has imported transformers (waited for here, not inside a request's build time)."""
        connection, theirs = multiprocessing.Pipe()
        process = start_forked(serve_sizes, theirs)
        theirs.close()
        if not connection.poll(STARTUP_S):
            log.error("the model sizing process did not start within %g s", STARTUP_S)
        else:
            connection.recv()
        return process, connection

    def _own(self) -> None:
        process, connection = self._start()  # at startup: the first request finds transformers imported
        while (item := self._requests.get()) is not STOP:
            spec, answer = item
            if not process.is_alive():  # killed after a timeout, or died: a fresh one
                process, connection = self._start()
            try:
                connection.send(spec)
                if not connection.poll(self.timeout_s):
                    raise TimeoutError
                status, *values = connection.recv()
            except (TimeoutError, EOFError, OSError):
                process.kill()
                process.join()
                connection.close()
                answer.set_exception(SpecError(
                    f"model: building this config took longer than {self.timeout_s:g} s on the meta device "
                    "(FITPROBE_MODEL_BUILD_TIMEOUT_S), which means far more layers or modules than a trainable "
                    "model has; pick a smaller config (fewer layers)"))
                continue
            if status == "ok":
                answer.set_result((values[0], values[1]))
            else:
                answer.set_exception(SpecError(values[0]))
        process.kill()
        process.join()
