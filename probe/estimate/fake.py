"""Estimate mode: THE training step under fake tensors, counting bytes, allocating nothing.

`FakeTensorMode` runs every op for its shapes, dtypes and aliasing only; the `LiveBytesMode` the
CPU meter uses sits on top of it and counts each storage the step creates (rounded to the CUDA
allocator's 512-byte blocks) until it dies. The model is built directly as fake parameters, so an
8B model costs kilobytes, and the search, the trial and the OOM path are the ones a real device runs:
past the named capacity the count raises the real `torch.OutOfMemoryError`.

What it cannot see: memory inside kernels (cuBLAS/cuDNN workspaces), the CUDA context, and the
caching allocator's fragmentation. On a CPU-only build the fake tensors are CPU tensors, so ops
whose CUDA kernels save different buffers (SDPA's flash/memory-efficient paths keep a logsumexp
instead of the attention matrix) are counted as the CPU kernels run them.

Mixture-of-experts models run too: transformers' default `grouped_mm` experts sort the token-expert
pairs and multiply them in one grouped matmul, so every shape is fixed by tokens × top-k, whatever
the router chose; no routing assumption is needed. The older per-expert loop (`nonzero` over the
router's choices) has shapes that only real data decides, and is refused before any trial.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fitprobe.probe.estimate import cache_key, cuda_attention, fast_outputs

from fitprobe.probe.models import quantization
from fitprobe.probe.meter import CpuMeter, LiveBytesMode
from fitprobe.probe.spec import SpecError

ACCURACY_NOTE = {
    "cuda": "fake CUDA tensors: the same kernels' shapes as a real CUDA run; not counted: kernel "
            "workspaces, the CUDA context and allocator fragmentation (keep the headroom)",
    "cpu": "fake CPU tensors (this torch build has no CUDA): attention and other ops are counted as "
           "their CPU kernels allocate, which can differ from CUDA's fused kernels; not counted: kernel "
           "workspaces, the CUDA context and allocator fragmentation (keep the headroom)",
}


def fake_device() -> torch.device:
    """CUDA fake tensors where torch has CUDA (closest to the real run), CPU ones otherwise."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _experts_run_by_grouped_mm(module: torch.nn.Module) -> bool:
    """Whether the module is a mixture of experts; refused when its experts' shapes depend on the routing."""
    config = getattr(module, "config", None)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not experts or experts < 2:
        return False
    if getattr(config, "_experts_implementation", None) != "grouped_mm":
        raise SpecError(
            "estimate mode cannot run this mixture-of-experts model: its experts loop over the router's "
            "choices (torch.where/nonzero), whose shapes only real data decides. Use measure mode, or "
            "transformers >= 5 with its default grouped_mm experts (fixed shapes: tokens x top-k)"
        )
    return True


class _GroupedMatmulAnyFloat(TorchDispatchMode):
    """aten._grouped_mm's fake (meta) kernel demands bf16, as the CUDA kernel once did; the CPU kernel and
    torch's CUDA fallback multiply fp32 and fp16 too, which is what full fine-tuning of an MoE with fp32
    master weights runs. Shapes don't depend on the dtype: ask the fake kernel in bf16, answer in the
    inputs' dtype (the bf16 copies sit below the byte counter, so they are not counted)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._grouped_mm.default and args[0].dtype in (torch.float32, torch.float16):
            mat_a, mat_b, *rest = args
            shaped = func(mat_a.to(torch.bfloat16), mat_b.to(torch.bfloat16), *rest, **kwargs)
            return mat_a.new_empty(shaped.shape)
        return func(*args, **kwargs)


class EstimateMeter(CpuMeter):
    """The CPU meter's count, under fake tensors: no memory used, any capacity, any model size."""

    kind = "estimate-fake-tensors"
    measures_time = False

    def __init__(self, capacity_bytes: int, gpu: str | None = None) -> None:
        super().__init__(capacity_bytes)
        self.device = fake_device()
        self.gpu = gpu
        # a named card: attention counted as its CUDA kernels run it (probe/estimate/cuda_attention.py)
        arch = cuda_attention.arch_of(gpu)
        self.attention = cuda_attention.CudaAttention(arch) if arch else None
        # real tensors met inside (e.g. a torch.Generator's state) are converted, not refused
        self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._mode = LiveBytesMode(capacity_bytes)
        self._has_experts = False

    def tracking(self) -> AbstractContextManager:
        # the counter must be pushed last: it sees each op first, then fake mode runs it
        stack = ExitStack()
        stack.enter_context(cache_key.keyed_fast())  # the same dispatch cache, sooner (cache_key.py)
        stack.enter_context(fast_outputs.built_fast())  # and its hits' outputs (fast_outputs.py)
        stack.enter_context(self._fake_mode)
        if self._has_experts:  # a Python mode taxes every op (~8 % of a 14B estimate): only where needed
            stack.enter_context(_GroupedMatmulAnyFloat())
        stack.enter_context(self._mode)
        if self.attention is not None:
            stack.enter_context(self.attention)
            stack.enter_context(cuda_attention.CudaKernelBuffers())  # above the counter: what it holds counts
        return stack

    def fake_tensors(self) -> AbstractContextManager:
        """Fake mode without the count: tensors made here occupy nothing on the device."""
        return self._fake_mode

    def materialize(self, module: torch.nn.Module) -> None:
        """Swap a meta-built module's weights for fake ones on the fake device, ties kept.

        Built on meta and swapped here because peft and `Module.to` cannot move fake parameters
        (`_apply` refuses to swap tensor subclasses); assigning them directly is all it takes.
        Call inside `tracking()` so the weights are counted, or inside `fake_tensors()` for weights that
        live elsewhere (the full model that FSDP shards). A mixture of experts whose shapes depend on the
        routing is refused here, before any trial.
        """
        self._has_experts = _experts_run_by_grouped_mm(module)
        fakes: dict[int, torch.Tensor] = {}
        for owner in module.modules():
            quantized = type(owner).__module__.startswith("bitsandbytes")
            if quantized:
                quantization.warm_up()
            # parameters and buffers alike: a slot takes a Parameter or a Tensor
            stores: tuple[dict[str, Any], ...] = (owner._parameters, owner._buffers)
            for store in stores:
                for name, tensor in store.items():
                    if tensor is None:
                        continue
                    if quantized and name == "weight":  # QLoRA's 4-bit base: quantized under fake tensors
                        store[name] = quantization.quantized_weight(owner, self.device, fake=True)
                        continue
                    if id(tensor) not in fakes:
                        fake = torch.empty_like(tensor, device=self.device)
                        if isinstance(tensor, torch.nn.Parameter):
                            fake = torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
                        fakes[id(tensor)] = fake
                    store[name] = fakes[id(tensor)]

    @property
    def accuracy_note(self) -> str:
        if self.attention is not None:
            return (f"fake tensors, attention counted as {self.gpu}'s CUDA kernels run it (see attention.kernels); "
                    "not counted: other kernels' workspaces, the CUDA context and allocator fragmentation "
                    "(keep the headroom)")
        return ACCURACY_NOTE[self.device.type]

    def kernel_facts(self) -> dict | None:
        """Which SDPA kernels the count assumed, per call pattern, and why (None: this host's kernels)."""
        if self.attention is None:
            return None
        major, minor = self.attention.arch
        return {"card": self.gpu, "compute_capability": f"{major}.{minor}",
                "assumed": "torch's default SDPA order on CUDA: flash, memory-efficient, math (builds that "
                           "prefer cuDNN attention on sm90/sm100 save the same tensors as flash, plus the mask)",
                "sdpa": self.attention.facts()}
