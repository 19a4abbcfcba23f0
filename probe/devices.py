"""What devices this machine has, from NVML (no CUDA context is created) and the host's RAM.

NVML answers without initialising CUDA, so the service can list GPUs, and see memory other
processes hold, without taking memory itself.
"""

from __future__ import annotations

import os
from typing import Any


def _gpus() -> list[dict[str, Any]]:
    try:
        import pynvml  # the nvidia-ml-py distribution

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library, no GPU: all mean "no GPUs here"
        return []
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            found.append({
                "device": f"cuda:{index}", "kind": "cuda", "name": name.decode() if isinstance(name, bytes) else name,
                "total_bytes": memory.total, "used_bytes": memory.used, "free_bytes": memory.free,
                "other_processes": [{"pid": p.pid, "used_bytes": p.usedGpuMemory} for p in processes],
            })
        return found
    finally:
        pynvml.nvmlShutdown()


def _host_memory_bytes() -> tuple[int, int]:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return total, available


# what a CPU job needs beyond the tensors it counts: the interpreter, torch, the model's Python objects
CPU_JOB_OVERHEAD_BYTES = 1 << 30


def cpu_capacity_limit_bytes() -> int:
    """The largest CPU virtual capacity this host can really give a probe right now.

    The CPU meter's capacity is real RAM: every counted byte is allocated. Past what is available
    the kernel's OOM-killer ends the process after minutes of swapping, so such a request is refused.
    """
    _, available = _host_memory_bytes()
    return max(available - CPU_JOB_OVERHEAD_BYTES, 0)


def list_devices(cpu_capacity_bytes: int) -> list[dict[str, Any]]:
    """Every GPU NVML sees; the CPU device (a virtual capacity) when there is none."""
    gpus = _gpus()
    if gpus:
        return gpus
    total, available = _host_memory_bytes()
    return [{"device": "cpu", "kind": "cpu", "name": "cpu (virtual capacity)", "total_bytes": total,
             "free_bytes": available, "capacity_bytes": cpu_capacity_bytes, "other_processes": []}]
