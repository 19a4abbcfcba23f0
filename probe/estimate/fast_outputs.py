"""A faster way to the same outputs: fake mode's cache hits, answered without `FakeTensor`'s general constructor.

The other half of a cache hit (cache_key.py is the key): torch answers a hit by building a new fake tensor
from the entry's metadata (`FakeTensorMode._get_output_tensor_from_cache_entry`), and most of that time is
spent being general: every argument of `FakeTensor.__new__` validated, its device normalized again, and ten
memo attributes set one by one through their descriptors. Measured on the 2-core host, a cached `mm` under
fake mode with the fast key: 105 µs an op; with the outputs built here, 66 µs.

`built_fast()` swaps in a version that builds the very same tensor for the common entry (a fresh output: not
in place, not a view, strided, concrete sizes, neither conjugated nor negated, no shape environment) the way
torch's constructor ends up building it: the meta tensor under the same guards, `Tensor._make_subclass` with
the same arguments, the same flag on its data pointer, and its attributes copied from a tensor that torch's
own constructor made. Anything else goes to torch's own path. So every byte the meter counts is unchanged
(tests/test_cache_key.py compares the two on every op of real steps).

It is only ever active inside the estimate meter's `tracking()` and only where this torch builds what the fast
path writes: outputs of probe ops are built both ways and compared once per process (`fast_outputs_match()`);
any difference, and torch's own path runs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorConfig, FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes

BuildOutput = Callable[..., Any]
_STRIDED = torch.strided
_make_subclass = torch.Tensor._make_subclass
_empty_strided = torch.empty_strided


# the attributes torch's constructor gives a fresh fake tensor, read off one it made (`fast_outputs_match`); the
# device and the mode are set per output
_fresh: dict[str, object] = {}


def _read_fresh_attributes() -> None:
    with _disable_current_modes(), FakeTensorMode():
        made = torch.empty(1)
    _fresh.update({name: value for name, value in vars(made).items() if name not in ("_fake_device", "fake_mode")})


def _fast_output(original: BuildOutput, mode: FakeTensorMode, state: Any, entry: Any, key: Any, func: Any,
                 args: Sequence[object]) -> Any:
    """`FakeTensorMode._get_output_tensor_from_cache_entry(state, entry, key, func, args)`, sooner where it can be."""
    metadata = entry.metadata
    if (metadata is None or entry.inplace_idx is not None or entry.view_idx is not None
            or not isinstance(func, torch._ops.OpOverload) or func.is_view  # a higher-order op: torch's own
            or mode.shape_env is not None or metadata.layout is not _STRIDED or metadata.is_conj or metadata.is_neg):
        return original(mode, state, entry, key, func, args)
    with torch._C._DisableTorchDispatch():  # as torch's in_kernel_invocation_manager: no mode sees the meta tensor
        empty = _empty_strided(metadata.shape, metadata.stride, dtype=metadata.dtype, layout=_STRIDED,
                               device="meta", requires_grad=metadata.requires_grad)
    output = _make_subclass(FakeTensor, empty, empty.requires_grad, dispatch_device=True,
                            device_for_backend_keys=metadata.device)
    if mode._allow_unsafe_data_ptr_access:
        torch._C._set_warn_deprecated_on_mutable_data_ptr(output)
    else:
        torch._C._set_throw_on_mutable_data_ptr(output)
    attributes = vars(output)
    attributes.update(_fresh)
    attributes["_fake_device"] = metadata.device
    attributes["fake_mode"] = mode
    return output


def _described(tensor: FakeTensor) -> tuple[object, ...]:
    """What a fake tensor is, beyond its identity and its mode: to compare a fast output with torch's own."""
    attributes = {name: value for name, value in vars(tensor).items() if name != "fake_mode"}
    return (type(tensor), tensor.shape, tensor.stride(), tensor.dtype, tensor.device, tensor.requires_grad,
            tensor.storage_offset(), tensor.untyped_storage().nbytes(), str(torch._C._dispatch_keys(tensor)),
            sorted(attributes.items(), key=lambda item: item[0]))


def _probe_outputs(mode: FakeTensorMode) -> list[Any]:
    """Outputs of ops that a step runs, each op twice so that the second is a cache hit."""
    outputs: list[Any] = []  # fake tensors, which torch's stubs type as Tensor
    with mode:
        a = torch.empty(3, 4, dtype=torch.bfloat16, requires_grad=True)
        b = torch.empty(4, 5, dtype=torch.bfloat16)
        for _ in range(2):
            # a fresh tensor, a 0-d one, a copy, and one strided as its transposed input (elementwise keeps layout)
            outputs += [a @ b, (a * 2).sum(), torch.empty(2, 3).t().contiguous(), a.t() * 2]
    return outputs


@functools.cache
def fast_outputs_match() -> bool:
    """Whether this torch's cache hits build what the fast path builds: probe ops' outputs compared, both ways."""
    if FakeTensorConfig.debug:  # torch's constructor then records a traceback per tensor
        return False
    original = FakeTensorMode._get_output_tensor_from_cache_entry
    try:
        _read_fresh_attributes()
        with _disable_current_modes():  # the probes are this check's own, whatever mode is on
            own_mode = FakeTensorMode()
            own = _probe_outputs(own_mode)
            fast_mode = FakeTensorMode()
            with _swapped(original):
                fast = _probe_outputs(fast_mode)
        return ([_described(t) for t in own] == [_described(t) for t in fast]
                and all(t.fake_mode is own_mode for t in own) and all(t.fake_mode is fast_mode for t in fast))
    except Exception:  # noqa: BLE001 - a torch whose internals moved: its own path, as before
        return False


@contextlib.contextmanager
def _swapped(original: BuildOutput) -> Iterator[None]:
    def build(mode: FakeTensorMode, *args: Any) -> Any:
        return _fast_output(original, mode, *args)

    FakeTensorMode._get_output_tensor_from_cache_entry = build  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        FakeTensorMode._get_output_tensor_from_cache_entry = original  # type: ignore[method-assign]


@contextlib.contextmanager
def built_fast() -> Iterator[None]:
    """Fake mode's cache hits built by the fast path for the duration, where it matches this torch's (else nothing)."""
    if not fast_outputs_match():
        yield
        return
    with _swapped(FakeTensorMode._get_output_tensor_from_cache_entry):
        yield
