"""The memory meters and the OOM predicate, on real exceptions and real tensors."""

from __future__ import annotations

import gc

import pytest
import torch

from fitprobe.probe.meter import CpuMeter, LiveBytesMode, is_oom, round_allocation

# Messages as PyTorch 2.x, cuBLAS and cuDNN print them.
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB "
            "of which 1.06 GiB is free. Of the allocated memory 75.1 GiB is allocated by PyTorch")
CUBLAS_OOM = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
ILLEGAL_ACCESS = ("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                  "asynchronously reported at some other API call")
DEVICE_ASSERT = "CUDA error: device-side assert triggered"


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError(CUDA_OOM), RuntimeError(CUDA_OOM),
                                 RuntimeError(CUBLAS_OOM), RuntimeError("CUDA error: out of memory")])
def test_memory_errors_are_classified_as_oom(exc):
    assert is_oom(exc)


@pytest.mark.parametrize("exc", [RuntimeError(ILLEGAL_ACCESS), RuntimeError(DEVICE_ASSERT),
                                 ValueError("out of memory"), RuntimeError("shape mismatch")])
def test_other_failures_are_not_mistaken_for_oom(exc):
    # shrinking the batch would not fix these: the search must stop, not bisect
    assert not is_oom(exc)


def test_allocations_are_rounded_like_the_cuda_caching_allocator():
    assert [round_allocation(n) for n in (0, 1, 512, 513, 4096)] == [0, 512, 512, 1024, 4096]


def test_cpu_meter_counts_live_tensors_and_forgets_freed_ones():
    mode = LiveBytesMode()
    with mode:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes -> 4096
        view = a[10:20]
        assert mode.live_bytes == 4096, "a view must not count twice"
        b = torch.empty(100, dtype=torch.float64)  # 800 -> 1024
        assert mode.live_bytes == 4096 + 1024
        del a, view, b
        gc.collect()
    assert mode.live_bytes == 0
    assert mode.peak_bytes == 4096 + 1024


def test_cpu_meter_raises_the_real_oom_error_in_backward():
    meter = CpuMeter(capacity_bytes=2 << 20)
    layer = torch.nn.Linear(512, 512)
    with meter.tracking():
        x = torch.randn(64, 512, requires_grad=True)
        with pytest.raises(torch.OutOfMemoryError):
            # 3 x 1 MiB activations + gradients: past 2 MiB during forward or backward
            layer(layer(layer(x))).pow(2).sum().backward()
        del x
        meter.release()
    assert meter.allocated_bytes() == 0
