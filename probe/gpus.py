"""Capacities of GPUs a user may plan for without having one (`--gpu NAME` in estimate mode).

Total memory is what `nvidia-smi` reports for each card (MiB), from NVIDIA's data sheets and
nvidia-smi output published for these cards; it is not measured by fitprobe. The capacity for
tensors is that total minus the CUDA context: the driver's context, cuBLAS handles and the kernels
loaded lazily by CUDA 12 take about 500 MiB on recent drivers. That 500 MiB is an assumption stated
here, not a measurement of ours; the headroom of the safe micro-batch covers the allocator's
fragmentation, which the estimate does not count.
"""

from __future__ import annotations

from fitprobe.probe.errors import SpecError

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
    # Each card below: the data sheet's size, and the nvidia-smi output its MiB figure was read from.
    # GeForce RTX 5090, 32 GB GDDR7: "32607MiB" in nvidia-smi on drivers 595 and 610
    # (github.com/noonghunna/club-3090 issues 617 and 1261)
    "rtx5090-32gb": 32607,
    # L40S, 48 GB GDDR6 with ECC on (its default): "46068 MiB" in nvidia-smi --query-gpu=memory.total,
    # driver 595.71.05 (github.com/akash-network/provider-configs pull 99)
    "l40s-48gb": 46068,
    # RTX 6000 Ada Generation, 48 GB GDDR6 (ECC off): "49140 MiB" in nvidia-smi reports on drivers 570 and
    # 580 (a RunPod validation log and a lerobot setup table); with ECC on, the driver keeps part back,
    # as the L40S above (the same AD102 and 48 GB) shows
    "rtx6000ada-48gb": 49140,
    # RTX PRO 6000 Blackwell Workstation Edition, 96 GB GDDR7: "97,887 MiB" (driver 595.91.07, an Isaac Lab
    # benchmark page) and "97887MB" in a hardware-detection log; the Server and Max-Q editions may differ
    "rtx-pro-6000-96gb": 97887,
    # B200: 192 GB of HBM3e on the package, 180 GB usable per GPU in the DGX B200 data sheet (1,440 GB for
    # eight); nvidia-smi prints "183359MiB" (driver 580.95.05, github.com/NVIDIA/TensorRT-LLM issue 10278)
    "b200-180gb": 183359,
    # H100 NVL, 94 GB HBM3: "95830MiB" in nvidia-smi, driver 535.183.01
    # (github.com/NVIDIA/gpu-admin-tools issue 4)
    "h100-94gb-nvl": 95830,
    # RTX A6000, 48 GB GDDR6 (ECC off): "49140 MiB" in nvidia-smi, driver 580.173.02
    # (github.com/noonghunna/club-3090 issue 1047)
    "a6000-48gb": 49140,
}


def gpu_capacity_bytes(name: str) -> int:
    """Bytes left for tensors on the named card."""
    if name not in GPU_TOTAL_MIB:
        raise SpecError(f"unknown GPU {name!r}; choose one of: {', '.join(GPU_TOTAL_MIB)}")
    return GPU_TOTAL_MIB[name] * MIB - CUDA_CONTEXT_BYTES
