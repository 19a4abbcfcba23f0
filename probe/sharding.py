"""FSDP2 for a built model, and the process group it shards over: one set-up for measuring and estimating.

`sharding: fsdp` answers "per device, with weights, gradients and optimizer state sharded over
num_devices" (ZeRO-3): `fully_shard` on every transformer block and at the root, parameters
resharded after forward, so a device holds one shard of everything plus the full weights of the one
or two blocks it is computing. As in torchtitan, the parallelism set-up is one function
(`build_sharded_model`) that the measured ranks (gloo on CPU, NCCL on GPUs) and the estimate (one
process, a fake process group of the same size, fake tensors) both call: they differ only in the
process group that exists when it runs and in whether the meter's tensors are real.

Not modelled: tensor, pipeline, context or expert parallelism, hybrid sharding (HSDP), CPU offload,
ZeRO++; `fully_shard` wraps outermost `nn.ModuleList` children only (no custom wrap policy).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from fitprobe.probe.estimate.fake import EstimateMeter
from fitprobe.probe.meter import CpuMeter, Meter
from fitprobe.probe.models.load import LoadedModel, build_model
from fitprobe.probe.spec import ProbeSpec, SpecError

PROCESS_GROUP_TIMEOUT_S = 120


@contextmanager
def process_group(world_size: int, rank: int = 0, backend: str = "fake", init_method: str | None = None
                  ) -> Iterator[None]:
    """This process as rank `rank` of the default process group of `world_size`, for the duration.

    "fake" (estimate mode) is a group whose collectives move nothing, so one process runs the step of
    one rank of N; "gloo"/"nccl" are the real groups of spawned ranks. Nothing outlives the block, so
    the next trial, or an unsharded step in the same process, does not find a group left behind.
    """
    if backend == "fake":
        # a private module, but the one torchtitan's estimator and torch's own tests use
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    else:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    try:
        yield
    except BaseException:
        # a failed real rank is stopped with its peers: tearing its group down could wait on them
        if backend == "fake":
            dist.destroy_process_group()
        raise
    dist.destroy_process_group()


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: children of the outermost `nn.ModuleList`s.

    That is `model.layers` (Llama, Mistral, Qwen…), `transformer.h` (GPT-2), the builtin GPT's
    `blocks`, found the same way through a peft wrapper; lists nested in a block (MoE experts)
    stay inside their block's shard group, as the block is what is gathered at once.
    """
    blocks: list[nn.Module] = []
    lists: list[str] = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and not any(name.startswith(outer + ".") for outer in lists):
            lists.append(name)
            blocks.extend(child for child in sub if any(True for _ in child.parameters()))
    return blocks


def mixed_precision_policy(spec: ProbeSpec) -> MixedPrecisionPolicy:
    """16-bit weights gathered for compute, gradients reduced in fp32: what FSDP2 mixed precision is.

    With this policy the forward already runs in 16 bits, so the step takes no autocast (see
    `step.autocast_for`), as torchtitan does. fp32 and pure bf16 gather and reduce in the weights' dtype.
    """
    if spec.precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if spec.precision == "fp16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(module: nn.Module, spec: ProbeSpec, mesh: DeviceMesh) -> None:
    """`fully_shard` every transformer block, then the root (embeddings, final norm, head), in place."""
    policy = mixed_precision_policy(spec)
    blocks = transformer_blocks(module)
    if not blocks:
        raise SpecError("sharding=fsdp shards a model block by block, and this model has no nn.ModuleList of "
                        "blocks; use sharding=none")
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    fully_shard(module, mesh=mesh, reshard_after_forward=True, mp_policy=policy)


def build_sharded_model(spec: ProbeSpec, meter: Meter, allowed_factories: Collection[str] = ()) -> LoadedModel:
    """The model as one rank of `spec.num_devices` holds it: built, sharded, its shards counted by `meter`.

    Needs the default process group (`process_group`). The full weights are built off the
    meter (real ones on the host as a loaded checkpoint is, fake ones for the estimate): what a device
    holds is what `fully_shard` makes, its shards, plus the buffers it does not shard. Building the full
    model under the meter would refuse models whose weights only fit once sharded.
    """
    world_size = dist.get_world_size()
    mesh = init_device_mesh(meter.device.type, (world_size,))  # before fake mode: it talks to the group
    full_capacity = meter.capacity_bytes * world_size
    if isinstance(meter, EstimateMeter):
        model = build_model(spec, "meta", allowed_factories, full_capacity)
        with meter.fake_tensors():
            meter.materialize(model.module)
    else:
        # on the host, as a checkpoint is loaded: fully_shard moves one block at a time to the device
        model = build_model(spec, "cpu", allowed_factories, full_capacity)
    with meter.tracking():
        shard_model(model.module, spec, mesh)
        if isinstance(meter, CpuMeter):  # the CUDA meter sees every allocation by itself
            meter.count(model.module.buffers())
    return model
