"""Capacities of GPUs a user may plan for without having one (`--gpu NAME` in estimate mode).

Total memory is what `nvidia-smi` reports for each card (MiB), from NVIDIA's data sheets and
nvidia-smi output published for these cards; it is not measured by fitprobe. The capacity for
tensors is that total minus the CUDA context: the driver's context, cuBLAS handles and the kernels
loaded lazily by CUDA 12 take about 500 MiB on recent drivers. That 500 MiB is an assumption stated
here, not a measurement of ours; the headroom of the safe micro-batch covers the allocator's
fragmentation, which the estimate does not count.
"""

from __future__ import annotations

from probe.spec import SpecError

MIB = 1 << 20
CUDA_CONTEXT_BYTES = 500 * MIB

# name -> total memory in MiB as nvidia-smi prints it
GPU_TOTAL_MIB: dict[str, int] = {
    "t4-16gb": 15360,
    "v100-16gb": 16384,
    "v100-32gb": 32768,
    "a10g-24gb": 23028,
    "l4-24gb": 23034,
    "rtx3090-24gb": 24576,
    "rtx4090-24gb": 24564,
    "a100-40gb": 40960,
    "a100-80gb": 81920,
    "h100-80gb": 81559,
    "h200-141gb": 143771,
}


def gpu_capacity_bytes(name: str) -> int:
    """Bytes left for tensors on the named card."""
    if name not in GPU_TOTAL_MIB:
        raise SpecError(f"unknown GPU {name!r}; choose one of: {', '.join(GPU_TOTAL_MIB)}")
    return GPU_TOTAL_MIB[name] * MIB - CUDA_CONTEXT_BYTES
