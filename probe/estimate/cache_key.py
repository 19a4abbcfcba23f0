"""A faster way to the same key: fake mode's dispatch cache, keyed without building a dataclass per tensor.

Under fake tensors every op looks up torch's dispatch cache (`FakeTensorMode._cached_dispatch_impl`): almost
every op of a training step hits it, so the step's cost is the lookup. Measured on a full-depth gemma2 trial
(py-spy, 2-core host): fake mode's dispatch was 69 % of the step, and building the key 29 %, most of it
`extract_tensor_metadata(t)._flatten_into(...)`: a 17-field `TensorMetadata` made for each tensor argument,
then walked with `dataclasses.fields()` and a recursive call per shape and stride.

`keyed_fast()` swaps in `_prep_args_for_hash` that appends the very same values, in the same order, straight
from an ordinary fake tensor (strided, this mode's own, no symbolic sizes, no constant): anything else takes
torch's own path, argument by argument. Same key, same cache: a hit answers what torch's own key would have
answered, so every byte the meter counts is unchanged (tests/test_cache_key.py compares the two keys on every
op of real steps). An estimated trial takes 5-25 % less time (bench/cache_key_speed.py; fast_outputs.py is
the other half of a hit).

It is only ever active inside the estimate meter's `tracking()` and only where this torch's key has the layout
written against: `TensorMetadata`'s fields, and the keys of a few probe tensors, are compared with torch's own
once per process (`fast_key_matches()`); any difference and torch's own path runs, as it always did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._prims_common import suggest_memory_format
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, TensorMetadata, _CacheKeyState
from torch.utils._python_dispatch import _disable_current_modes

# the layout of TensorMetadata that the fast path writes out, field by field
_FIELDS = ("dtype", "shape", "stride", "device", "layout", "memory_format", "storage_offset", "storage_bytes",
           "requires_grad", "is_quantized", "is_conj", "is_neg", "is_inference", "is_sparse", "is_coalesced",
           "dense_dim", "sparse_dim")
# arguments whose key is their type and themselves (torch's last branch), taken without the chain of isinstance
_PLAIN = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                    torch.memory_format})
_STRIDED = torch.strided

PrepArgs = Callable[..., None]


def _prep_args_fast(original: PrepArgs, mode: FakeTensorMode, result: list[object], args: Any,
                    state: Any, id_hashed_objects: list[object]) -> None:
    """`FakeTensorMode._prep_args_for_hash(result, args, state, ids)`, appending what it appends."""
    kind = type(args)
    if kind is tuple or kind is list:
        result.append(kind)
        result.append(f"length_{len(args)}")
    elif isinstance(args, (list, tuple, dict)):  # dicts, and subclasses: all torch's
        original(mode, result, args, state, id_hashed_objects)
        return
    append = result.append
    for arg in args:
        if (type(arg) is FakeTensor and arg.fake_mode is mode and arg.constant is None and arg.layout is _STRIDED
                and not arg._has_symbolic_sizes_strides):
            # extract_tensor_metadata(arg)._flatten_into(...), for a dense tensor with concrete sizes
            shape, stride = arg.shape, arg.stride()
            suggested = suggest_memory_format(arg)
            memory_format = suggested if arg.is_contiguous(memory_format=suggested) else None
            append(arg.dtype)
            append(torch.Size)
            append(f"length_{len(shape)}")
            for size in shape:
                append(int)
                append(size)
            append(tuple)
            append(f"length_{len(stride)}")
            for step in stride:
                append(int)
                append(step)
            result.extend((arg.device, _STRIDED, memory_format, arg.storage_offset(),
                           arg.untyped_storage().nbytes(), arg.requires_grad, arg.is_quantized, arg.is_conj(),
                           arg.is_neg(), arg.is_inference(), False, None, None, None))
        elif type(arg) in _PLAIN:
            append(type(arg))
            append(arg)
        else:  # torch's own branch for this one argument, without the (arg,) wrapper's two entries
            own: list[object] = []
            original(mode, own, (arg,), state, id_hashed_objects)
            result.extend(own[2:])


def _probe_arguments(mode: FakeTensorMode) -> list[tuple[Any, ...]]:
    """Arguments that take each branch of the fast path: layouts, views, dtypes, flags, plain values."""
    with mode:
        base = torch.empty(2, 3, 4, 5)
        channels_last = torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
        needs_grad = torch.empty(3, 4, dtype=torch.bfloat16, requires_grad=True)
        scalar = torch.empty((), dtype=torch.int64)
        conjugated = torch.empty(3, dtype=torch.complex64).conj()
    return [(base, 2, 1.5, True, None, "x"), (base[:, 1:], base.transpose(0, 3), channels_last),
            (needs_grad, [needs_grad, scalar], (3, [4, 5])), (conjugated, torch.float16, torch.device("cpu"))]


@functools.cache
def fast_key_matches() -> bool:
    """Whether this torch's key is the one the fast path writes: fields, and probe tensors' keys, compared."""
    if tuple(field.name for field in dataclasses.fields(TensorMetadata)) != _FIELDS:
        return False
    original = FakeTensorMode._prep_args_for_hash
    try:
        with _disable_current_modes():  # the probe tensors are this check's own, whatever mode is on
            mode = FakeTensorMode()
            probes = _probe_arguments(mode)
        for args in probes:
            own: list[object] = []
            fast: list[object] = []
            original(mode, own, args, _CacheKeyState(None), [])
            _prep_args_fast(original, mode, fast, args, _CacheKeyState(None), [])
            if own != fast or [type(v) for v in own] != [type(v) for v in fast]:
                return False
    except Exception:  # noqa: BLE001 - a torch whose internals moved: its own path, as before
        return False
    return True


@contextlib.contextmanager
def keyed_fast() -> Iterator[None]:
    """Fake mode's cache keyed by the fast path for the duration, where it matches this torch's (else nothing)."""
    if not fast_key_matches():
        yield
        return
    original = FakeTensorMode._prep_args_for_hash

    def prep_args(mode: FakeTensorMode, *args: Any) -> None:
        _prep_args_fast(original, mode, *args)

    FakeTensorMode._prep_args_for_hash = prep_args  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        FakeTensorMode._prep_args_for_hash = original  # type: ignore[method-assign]
