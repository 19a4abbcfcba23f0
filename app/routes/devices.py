"""The devices jobs run on, with memory other processes hold (NVML)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from fitprobe.app.deps import SettingsDep
from fitprobe.probe.devices import list_devices

router = APIRouter(prefix="/v1/devices", tags=["devices"])


@router.get("", summary="GPUs (or the CPU device) this service runs probes on")
def devices(settings: SettingsDep) -> dict[str, Any]:
    return {"devices": list_devices(settings.cpu_capacity_bytes)}
