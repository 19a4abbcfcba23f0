"""Memory meters: one interface, three ways of knowing how many bytes a training step needs.

- `CudaMeter` reads the CUDA caching allocator's own statistics, and enforces a capacity below the
  card's with `set_per_process_memory_fraction`, so an "OOM at 40 GiB" on an 80 GiB card is a real
  allocator OOM, not arithmetic.
- `CpuMeter` counts the bytes of every live tensor storage (rounded as the CUDA allocator rounds)
  against a virtual capacity and raises the real `torch.OutOfMemoryError` past it. The search and
  recovery code CI runs is therefore the code a GPU runs.
- `EstimateMeter` (probe/estimate/fake.py) does the CPU meter's count under fake tensors.

Never read `torch.cuda.*` memory stats on a CPU build: they return 0 and every batch "fits".
"""

from __future__ import annotations

import gc
import re
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal, Protocol, overload

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from fitprobe.probe.allocation_log import (
    Allocate,
    AllocationLog,
    Free,
    FreeEarlier,
    Keep,
    Moment,
    PhaseChange,
    Reclass,
    ReclassEarlier,
    Resize,
    TrialStart,
)
from fitprobe.probe.breakdown import ACTIVATIONS, CATEGORIES, TEMPORARIES, WEIGHTS, as_dict
from fitprobe.probe.settings import DEFAULT_CPU_CAPACITY_BYTES

CUDA_BLOCK_BYTES = 512  # the caching allocator rounds every request up to a multiple of 512 bytes

# Messages PyTorch, cuBLAS and cuDNN use when they could not get memory. Anything else from CUDA
# (illegal address, device-side assert) is a failure, not "too big": it must not shrink the batch.
_OOM_MARKERS = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "cannot allocate memory",
)


def is_oom(exc: BaseException) -> bool:
    """True when `exc` means the step did not fit in memory (and a smaller batch may)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and len(exc.args) == 1 and any(
        marker in str(exc.args[0]) for marker in _OOM_MARKERS
    )


def round_allocation(n_bytes: int) -> int:
    """Bytes the CUDA caching allocator hands out for a request of `n_bytes`."""
    if n_bytes <= 0:
        return 0
    return -(-n_bytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


@dataclass
class OomFacts:
    """Where an allocation failed: bytes already live, and the request that did not fit.

    A failed trial has no peak: the step stopped part-way, so its live bytes say nothing about what
    it needs (and are not even monotonic in the micro-batch). These two numbers are what it saw.
    """

    live_bytes: int | None
    request_bytes: int | None


_CUDA_REQUEST = re.compile(r"Tried to allocate ([\d.]+) ?(B|KiB|MiB|GiB|TiB)")
_BINARY_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def requested_bytes(message: str) -> int | None:
    """The failed request's size from CUDA's OOM message ("Tried to allocate 2.00 GiB")."""
    match = _CUDA_REQUEST.search(message)
    return int(float(match.group(1)) * _BINARY_UNITS[match.group(2)]) if match else None


@dataclass
class MemoryReading:
    """Peaks of one trial: overall, and per phase of the step (the peak moves between phases)."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    alloc_retries: int = 0
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
    breakdown: dict[str, int] | None = None  # the peak by category (probe/breakdown.py); None: not known

    def plus(self, n_bytes: int, category: str) -> MemoryReading:
        """The reading with `n_bytes` of `category` more live throughout (memory the meter cannot see, e.g.
        paged optimizer state)."""
        breakdown = None if self.breakdown is None else {**self.breakdown,
                                                         category: self.breakdown[category] + n_bytes}
        return MemoryReading(self.peak_allocated_bytes + n_bytes, self.peak_reserved_bytes + n_bytes,
                             self.alloc_retries, {k: v + n_bytes for k, v in self.phase_peak_bytes.items()},
                             breakdown)


class Meter(Protocol):
    device: torch.device
    capacity_bytes: int
    kind: str
    measures_time: bool  # False under fake tensors: their step time says nothing about the device

    def tracking(self) -> AbstractContextManager: ...
    def paused(self) -> AbstractContextManager: ...
    def start_trial(self) -> None: ...
    def phase(self, name: str) -> None: ...
    def reading(self) -> MemoryReading: ...
    def oom_facts(self, exc: BaseException) -> OomFacts: ...
    def allocated_bytes(self) -> int: ...
    def synchronize(self) -> None: ...
    def release(self) -> None: ...
    # what the step tells the meter about its storages (probe/breakdown.py)
    def tag(self, tensors: list[torch.Tensor], category: int) -> None: ...
    def allocate_as(self, category: int) -> None: ...
    def keep_for_backward(self) -> None: ...


# Ops this mode can pass straight through. prim.device: the autograd engine asks fake tensors for their
# device through the dispatcher, more often than all other ops together (161k of 254k dispatches in a
# Gemma-2 extrapolation test), so a fake tensor's is answered here, as fake mode would, without a second
# dispatch. View ops (`func.is_view`) alias their input's storage by schema: they never allocate. lift_fresh: a tensor made
# from Python data (AdamW's step counts); on a real device it is allocated below this mode and never
# seen, under fake tensors it would be: neither meter counts it.
_DEVICE = torch.ops.prim.device.default
_ALLOCATES_NOTHING = frozenset({_DEVICE, torch.ops.aten.lift_fresh.default})


def _tensors(tree: object) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or outputs (tuples, lists, dicts): pytree's job, a few times faster."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def _is_dtensor_type(kind: type) -> bool:
    return kind.__name__ == "DTensor" and kind.__module__.startswith("torch.distributed.tensor")


class LiveBytesMode(TorchDispatchMode):
    """Counts the rounded bytes of every tensor storage created while active, until it is freed.

    A storage is counted once, when an op first returns it; a view of a counted (or pre-existing)
    storage adds nothing. A weakref finalizer on the storage subtracts it when it dies.

    What FSDP2 does that a dispatch mode alone would get wrong is handled here, as torch's own
    `MemTracker` does: FSDP2 frees and re-allocates unsharded parameters with `UntypedStorage.resize_`
    (the storage object lives on at 0 bytes, so no finalizer fires), which is patched while the mode is
    active; its parameters are DTensors, which the mode lets desugar into the local-shard ops that
    really allocate; and DTensor works out each new op's output sharding by running the op on
    full-size (global) fake tensors, which occupy no device and are not counted.
    """

    def __init__(self, capacity_bytes: int | None = None) -> None:
        super().__init__()
        self.capacity_bytes = capacity_bytes
        self.live_bytes = 0
        self.peak_bytes = 0
        self.phase = "idle"
        self.phase_peak_bytes: dict[str, int] = {}
        self.last_oom = OomFacts(None, None)
        # (phase, live bytes) after every op that allocated, and at every phase change: the moments a peak
        # can sit at, in order (probe/estimate/extrapolate.py aligns two cuts' traces). None: not recorded, no cost.
        self.trace: list[tuple[str, int]] | None = None
        self.log: AllocationLog | None = None  # every event behind the trace (probe/allocation_log.py), when replay.py asks
        self._counted: dict[int, int] = {}  # id(storage) -> bytes counted for it now
        # the breakdown (probe/breakdown.py): each counted storage's category, the live bytes per category, the
        # category new storages get, and the counts at the latest moment at the peak (with the trace, at each)
        self._category: dict[int, int] = {}
        self.categories = [0] * len(CATEGORIES)
        self.context = TEMPORARIES
        self.peak_categories = list(self.categories)
        self.trace_categories: list[tuple[int, ...]] = []
        self._paused = 0
        self._patches: list[ExitStack] = []

    def __enter__(self) -> LiveBytesMode:
        patches = ExitStack()
        patches.enter_context(_patched(torch.UntypedStorage, "resize_", self._after_resize))
        propagator = _dtensor_sharding_propagator()
        if propagator is not None:
            patches.enter_context(_patched(propagator, "_propagate_tensor_meta_non_cached", self._uncounted))
        self._patches.append(patches)
        return super().__enter__()

    def __exit__(self, *exc_info) -> None:
        self._patches.pop().close()
        return super().__exit__(*exc_info)

    def _after_resize(self, call, storage: torch.UntypedStorage, *args, **kwargs):
        result = call(storage, *args, **kwargs)
        self._resized(storage)
        return result

    def _uncounted(self, call, *args, **kwargs):
        with self.paused():
            return call(*args, **kwargs)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Storages made inside are not counted, as if the mode were off (they cannot overflow either)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def count(self, tensor: torch.Tensor) -> None:
        """Count a tensor created before the mode was entered (model weights built elsewhere)."""
        self._add(tensor.untyped_storage(), raise_on_overflow=False)

    def set_phase(self, name: str) -> None:
        self.phase = name
        self.context = TEMPORARIES
        self.phase_peak_bytes[name] = max(self.phase_peak_bytes.get(name, 0), self.live_bytes)
        if self.log is not None:
            self.log.events.append(PhaseChange(name))
        self._moment()

    def reset_peaks(self) -> None:
        """A trial starts: peaks from here, and everything live now is the model's (weights)."""
        self.peak_bytes = self.live_bytes
        self.phase_peak_bytes = {self.phase: self.live_bytes}
        self._category = dict.fromkeys(self._category, WEIGHTS)
        self.categories = [0] * len(CATEGORIES)
        self.categories[WEIGHTS] = self.live_bytes
        if self.trace is not None:
            self.trace.clear()
            self.trace_categories.clear()
        if self.log is not None:
            self.log.events.append(TrialStart())
        self._moment()

    def _moment(self) -> None:
        """After an op that allocated, a phase change, a storage grown: the latest moment at the peak keeps its
        categories, and the trace (when on) records the moment."""
        if self.live_bytes >= self.peak_bytes:
            self.peak_categories = self.categories.copy()
        if self.trace is not None:
            self.trace.append((self.phase, self.live_bytes))
            self.trace_categories.append(tuple(self.categories))

    def tag(self, tensors: Iterable[torch.Tensor], category: int) -> None:
        """Give the counted storages behind `tensors` another category (a `.grad`, optimizer state, a batch)."""
        for tensor in tensors:
            local = getattr(tensor, "_local_tensor", tensor)  # a DTensor's bytes are its shard's
            key = id(local.untyped_storage())
            old = self._category.get(key)
            if old is None or old == category:
                continue
            n_bytes = self._counted[key]
            self._category[key] = category
            self.categories[old] -= n_bytes
            self.categories[category] += n_bytes
            if self.log is not None:
                number = self.log.numbers.get(key)
                self.log.events.append(Reclass(number, category) if number is not None
                                       else ReclassEarlier(n_bytes, old, category))

    def keep_for_backward(self) -> None:
        """The forward reached the loss head: its temporaries still live are what the backward reads."""
        for key, category in self._category.items():
            if category == TEMPORARIES:
                self._category[key] = ACTIVATIONS
        self.categories[ACTIVATIONS] += self.categories[TEMPORARIES]
        self.categories[TEMPORARIES] = 0
        if self.log is not None:
            self.log.events.append(Keep())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE and type(args[0]) is FakeTensor and not args[0].fake_mode.in_kernel_invocation:
            return args[0].fake_device  # what fake mode would answer, one dispatch sooner
        if any(_is_dtensor_type(kind) for kind in types):
            return NotImplemented  # DTensor runs its local ops, which come back through this mode
        out = func(*args, **(kwargs or {}))
        if self._paused or func.is_view or func in _ALLOCATES_NOTHING:
            return out
        inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs))}
        allocated = False
        for tensor in _tensors(out):
            # meta tensors (a model sized before it is built) occupy nothing
            if tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                if id(storage) not in inputs:
                    allocated |= self._add(storage, raise_on_overflow=True)
        # one moment per op, after all its outputs: the largest of its own (an op only adds)
        if allocated:
            if self.log is not None:
                self.log.events.append(Moment())
            self._moment()
        return out

    def _add(self, storage: torch.UntypedStorage, raise_on_overflow: bool) -> bool:
        """Count a storage not counted yet; whether it was new."""
        key = id(storage)
        if key in self._counted:
            return False
        requested = storage.nbytes()
        n_bytes = round_allocation(requested)
        self._counted[key] = n_bytes
        self._category[key] = self.context
        if self.log is not None:
            self.log.numbers[key] = number = len(self.log.sizes)
            self.log.sizes.append(requested)
            self.log.categories.append(self.context)
            self.log.events.append(Allocate(number))
        weakref.finalize(storage, self._free, key)
        self._grow(n_bytes, raise_on_overflow, self.context)
        return True

    def _resized(self, storage: torch.UntypedStorage) -> None:
        """A counted storage changed size in place: count its new size (FSDP2's free and re-gather)."""
        key = id(storage)
        if key not in self._counted:
            return
        n_bytes = round_allocation(storage.nbytes())
        delta, self._counted[key] = n_bytes - self._counted[key], n_bytes
        if self.log is not None:
            self.log.events.append(Resize(self.log.numbers.get(key)))
        self._grow(delta, delta > 0, self._category[key])
        # a gathered parameter is a moment as an op's output is: FSDP2 gathers into it, then frees the
        # all-gather buffer, so the peak can sit between the two with no allocating op after it
        if delta > 0:
            if self.log is not None:
                self.log.events.append(Moment())
            self._moment()

    def _grow(self, n_bytes: int, raise_on_overflow: bool, category: int) -> None:
        self.live_bytes += n_bytes
        self.categories[category] += n_bytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_categories = self.categories.copy()
        self.phase_peak_bytes[self.phase] = max(self.phase_peak_bytes.get(self.phase, 0), self.live_bytes)
        if raise_on_overflow and self.capacity_bytes is not None and self.live_bytes > self.capacity_bytes:
            self.last_oom = OomFacts(self.live_bytes - n_bytes, n_bytes)
            raise torch.OutOfMemoryError(
                # worded like CUDA's message ("... out of memory. Tried to allocate"), which tools
                # such as Accelerate's find_executable_batch_size recognise
                f"virtual device out of memory. Tried to allocate {n_bytes} bytes with "
                f"{self.live_bytes - n_bytes} bytes live of a {self.capacity_bytes}-byte capacity"
            )

    def _free(self, key: int) -> None:
        n_bytes = self._counted.pop(key, 0)
        category = self._category.pop(key, TEMPORARIES)
        self.live_bytes -= n_bytes
        self.categories[category] -= n_bytes
        if self.log is not None:
            number = self.log.numbers.pop(key, None)
            self.log.events.append(Free(number) if number is not None else FreeEarlier(n_bytes, category))


@contextmanager
def _patched(owner: type, name: str, wrapper: Callable) -> Iterator[None]:
    """Replace `owner.name` by `wrapper(original, *args)` for the duration, then restore it."""
    original = getattr(owner, name)

    def patched(*args, **kwargs):
        return wrapper(original, *args, **kwargs)

    setattr(owner, name, patched)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _dtensor_sharding_propagator() -> type | None:
    """DTensor's sharding propagator, if DTensor is in use in this process (else nothing to patch)."""
    module = sys.modules.get("torch.distributed.tensor._sharding_prop")
    propagator = getattr(module, "ShardingPropagator", None)
    return propagator if hasattr(propagator, "_propagate_tensor_meta_non_cached") else None


class CpuMeter:
    """Virtual-capacity meter for the CPU: the same OOM, the same recovery, no GPU needed."""

    kind = "cpu-live-bytes"
    measures_time = True

    def __init__(self, capacity_bytes: int | None = None) -> None:
        self.device = torch.device("cpu")
        self.capacity_bytes = capacity_bytes or DEFAULT_CPU_CAPACITY_BYTES
        self._mode = LiveBytesMode(self.capacity_bytes)

    def tracking(self) -> AbstractContextManager:
        return self._mode

    def paused(self) -> AbstractContextManager:
        """Inside tracking, what is not the step's: measurements taken around it (the verification's)."""
        return self._mode.paused()

    def start_trial(self) -> None:
        self._mode.reset_peaks()

    def phase(self, name: str) -> None:
        self._mode.set_phase(name)

    def reading(self) -> MemoryReading:
        peak = self._mode.peak_bytes
        # no caching allocator on the CPU: what is reserved is what is allocated
        return MemoryReading(peak, peak, 0, dict(self._mode.phase_peak_bytes), as_dict(self._mode.peak_categories))

    def tag(self, tensors: list[torch.Tensor], category: int) -> None:
        self._mode.tag(tensors, category)

    def allocate_as(self, category: int) -> None:
        self._mode.context = category

    def keep_for_backward(self) -> None:
        self._mode.keep_for_backward()

    def oom_facts(self, exc: BaseException) -> OomFacts:
        return self._mode.last_oom

    @overload
    def record_trace(self, on: Literal[True]) -> list[tuple[str, int]]: ...
    @overload
    def record_trace(self, on: Literal[False]) -> None: ...

    def record_trace(self, on: bool) -> list[tuple[str, int]] | None:
        """From the next trial on, keep its (phase, live bytes) moments in the list returned (None: stop)."""
        self._mode.trace = [] if on else None
        self._mode.trace_categories = []
        return self._mode.trace

    def trace_categories(self) -> list[tuple[int, ...]]:
        """The bytes by category at each moment of the trace being recorded (probe/breakdown.py's order)."""
        return self._mode.trace_categories

    def record_log(self, on: bool) -> AllocationLog | None:
        """From now on, log every allocation, free and moment (probe/allocation_log.py, for estimate/replay.py); None: stop."""
        mode = self._mode
        mode.log = AllocationLog(mode.live_bytes, mode.phase) if on else None
        return mode.log

    def allocated_bytes(self) -> int:
        return self._mode.live_bytes

    def count(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors made off the meter that the device keeps (buffers FSDP leaves unsharded)."""
        for tensor in tensors:
            self._mode.count(tensor)

    def synchronize(self) -> None:
        return None

    def release(self) -> None:
        gc.collect()


class CudaMeter:
    """The caching allocator's statistics on one CUDA device, capped at `capacity_bytes`."""

    kind = "cuda-allocator"
    measures_time = True

    def __init__(self, device: torch.device, capacity_bytes: int | None = None) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CudaMeter needs a CUDA build of torch and a visible GPU; use CpuMeter")
        self.device = device
        total = torch.cuda.get_device_properties(device).total_memory
        self.capacity_bytes = min(capacity_bytes or total, total)
        # the cap makes the allocator raise a real OOM at capacity, as on the smaller card
        torch.cuda.set_per_process_memory_fraction(self.capacity_bytes / total, device)
        self._phase = "idle"
        self._phase_peaks: dict[str, int] = {}
        self._peak_reserved_bytes = 0
        self._retries_at_start = 0

    def tracking(self) -> AbstractContextManager:
        return nullcontext()

    def paused(self) -> AbstractContextManager:
        # the allocator counts everything; callers reset the peaks after what must not count
        return nullcontext()

    def start_trial(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._phase_peaks = {}
        self._peak_reserved_bytes = 0
        self._retries_at_start = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)

    def phase(self, name: str) -> None:
        # allocations are recorded when kernels are launched, on the host: no sync needed
        peak = torch.cuda.max_memory_allocated(self.device)
        self._phase_peaks[self._phase] = max(self._phase_peaks.get(self._phase, 0), peak)
        self._peak_reserved_bytes = max(self._peak_reserved_bytes, torch.cuda.max_memory_reserved(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        self._phase = name

    def reading(self) -> MemoryReading:
        self.phase(self._phase)
        stats = torch.cuda.memory_stats(self.device)
        return MemoryReading(
            peak_allocated_bytes=max(self._phase_peaks.values(), default=0),
            peak_reserved_bytes=self._peak_reserved_bytes,
            alloc_retries=stats.get("num_alloc_retries", 0) - self._retries_at_start,
            phase_peak_bytes=dict(self._phase_peaks),
        )

    def oom_facts(self, exc: BaseException) -> OomFacts:
        # called before the failed step's frames are cleared: what they hold is still allocated
        return OomFacts(torch.cuda.memory_allocated(self.device), requested_bytes(str(exc)))

    def allocated_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    # no per-allocation hook: the reading has no breakdown (probe/breakdown.py CUDA_NOT_BROKEN_DOWN)
    def tag(self, tensors: list[torch.Tensor], category: int) -> None:
        return None

    def allocate_as(self, category: int) -> None:
        return None

    def keep_for_backward(self) -> None:
        return None


def make_meter(device: str, capacity_bytes: int | None) -> Meter:
    """The measuring meter for a device string from the spec."""
    if device == "cpu":
        return CpuMeter(capacity_bytes)
    return CudaMeter(torch.device(device), capacity_bytes)
