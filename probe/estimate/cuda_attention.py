"""Attention as a named CUDA card runs it, counted under fake tensors on any host.

`F.scaled_dot_product_attention` is one call with four kernels behind it. On CUDA, torch picks
one by the card's compute capability, the dtype, the head size, the mask and dropout
(`select_sdp_backend` in aten/src/ATen/native/transformers/cuda/sdp_utils.cpp), and each keeps
different tensors for the backward: flash and memory-efficient attention a float32 logsumexp of
batch × heads × seq (memory-efficient rounds seq up to 32), the math fallback the whole
batch × heads × seq × seq attention matrix. A CPU host runs its own kernels, and fake CUDA tensors
cannot run SDPA on a CPU-only build (its CUDA dispatch aborts the process), so an estimate for a
card would otherwise count what this host's CPU does.

`CudaAttention` replaces the call, while an estimate for a named card runs, with what torch's
composite `scaled_dot_product_attention` does on CUDA (aten/src/ATen/native/transformers/attention.cpp):
the backend `select_backend` picks for that card, the boolean mask made additive in the query's
dtype, the mask padded to 8 columns for memory-efficient attention, head sizes padded to 8 for
flash, then the backend's own aten op, whose shape function (torch's meta registration) gives its
outputs and whose autograd node saves what the CUDA kernel saves. `CudaKernelBuffers` adds the
buffers the flash backward allocates around its kernel (flash_attn/flash_api.cpp `mha_bwd`):
`softmax_d`, the float32 `dq_accum`, and key/value gradients expanded to every query head under
grouped-query attention, alive while the kernel runs.

Assumed, and said in the report: torch's default backend order (flash, memory-efficient, math).
Builds whose cuDNN prefers cuDNN attention on sm90/sm100 save the same tensors as flash (the
logsumexp as batch × heads × seq × 1) plus the mask when there is one. Not counted: the
memory-efficient backward's CUTLASS workspace (its size depends on the kernel's tiling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)

# compute capability (major, minor) of each card fitprobe knows (probe/gpus.py), from NVIDIA's CUDA GPU list
CARD_ARCH: dict[str, tuple[int, int]] = {
    "t4-16gb": (7, 5), "v100-16gb": (7, 0), "v100-32gb": (7, 0), "a10g-24gb": (8, 6), "l4-24gb": (8, 9),
    "rtx3090-24gb": (8, 6), "rtx4090-24gb": (8, 9), "a100-40gb": (8, 0), "a100-80gb": (8, 0),
    "h100-80gb": (9, 0), "h200-141gb": (9, 0), "rtx5090-32gb": (12, 0), "l40s-48gb": (8, 9),
    "rtx6000ada-48gb": (8, 9), "rtx-pro-6000-96gb": (12, 0), "b200-180gb": (10, 0),
    "h100-94gb-nvl": (9, 0), "a6000-48gb": (8, 6),
}


@dataclass(frozen=True)
class Choice:
    """The backend SDPA would run, and the first rule that ruled out each faster one."""

    backend: str  # "flash" | "efficient" | "math"
    why: str


def _in(arch: tuple[int, int], low: tuple[int, int], high: tuple[int, int]) -> bool:
    return low <= arch <= high


def _heads_fit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> bool:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if enable_gqa:
        return q.size(1) % k.size(1) == 0 and q.size(1) % v.size(1) == 0
    return q.size(1) == k.size(1) == v.size(1)


def _flash_refusal(arch, q, k, v, mask, dropout_p, is_causal, enable_gqa, needs_grad) -> str | None:
    d_q, d_k, d_v = q.size(-1), k.size(-1), v.size(-1)
    if mask is not None:
        return "flash takes no attention mask"
    if not (d_q == d_k == d_v and d_q <= 256):
        return f"flash needs equal head sizes <= 256 (q {d_q}, k {d_k}, v {d_v})"
    if not _in(arch, (8, 0), (12, 1)):
        return f"flash needs sm80-sm121 (this card is sm{arch[0]}{arch[1]})"
    if needs_grad and (_in(arch, (8, 6), (8, 9)) or _in(arch, (12, 0), (12, 1))):
        if not (d_q <= 192 or (dropout_p == 0 and d_q > 224)):
            return f"flash cannot train head size {d_q} on sm{arch[0]}{arch[1]}"
    if is_causal and q.size(-2) != k.size(-2):
        return "flash's causal flag needs equal query and key lengths"
    if q.dtype not in HALF:
        return f"flash runs fp16/bf16 only (query is {q.dtype})"
    if not _heads_fit(q, k, v, enable_gqa):
        return "flash needs 4-D inputs with matching (or grouped) heads"
    return None


def _efficient_refusal(arch, q, k, v, enable_gqa) -> str | None:
    if not _in(arch, (5, 0), (12, 1)):
        return f"memory-efficient attention needs sm50-sm121 (this card is sm{arch[0]}{arch[1]})"
    is_half = q.dtype in HALF
    tensor_cores = arch[0] >= 8 or (arch[0] >= 7 and is_half)
    alignment = 4 if arch[0] >= 8 else 1
    if tensor_cores:
        alignment = max(alignment, 128 // (16 if is_half else 32))
    d_q, d_k, d_v = q.size(-1), k.size(-1), v.size(-1)
    if d_q != d_k or d_q % alignment or d_v % alignment:
        return f"memory-efficient attention needs head sizes divisible by {alignment} (q {d_q}, v {d_v})"
    if not _heads_fit(q, k, v, enable_gqa):
        return "memory-efficient attention needs 4-D inputs with matching (or grouped) heads"
    dtypes = (torch.float16, torch.float32, torch.bfloat16) if arch[0] >= 8 else (torch.float16, torch.float32)
    if q.dtype not in dtypes:
        return f"memory-efficient attention on sm{arch[0]}{arch[1]} does not run {q.dtype}"
    return None


def select_backend(arch: tuple[int, int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                   enable_gqa: bool = False, needs_grad: bool = True) -> Choice:
    """torch's default choice on CUDA (flash, then memory-efficient, then math), rule by rule."""
    flash = _flash_refusal(arch, q, k, v, mask, dropout_p, is_causal, enable_gqa, needs_grad)
    if flash is None:
        return Choice("flash", "flash attention: no mask, fp16/bf16, head size <= 256")
    efficient = _efficient_refusal(arch, q, k, v, enable_gqa)
    if efficient is None:
        return Choice("efficient", f"memory-efficient attention ({flash})")
    return Choice("math", f"math fallback ({flash}; {efficient})")


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """attention.cpp's convert_boolean_attn_mask: a bool mask becomes a new tensor in the query's dtype."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask.logical_not(), -math.inf, torch.scalar_tensor(0.0, dtype=dtype, device=mask.device))


def _aligned_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """attention.cpp's preprocess_mask: pad the last dim so every stride is a multiple of 8, then expand."""
    if mask.stride(-1) != 1 or any(mask.stride(i) % 8 for i in range(mask.dim() - 1)):
        columns = mask.size(-1)
        mask = F.pad(mask, (0, 8 - columns % 8))[..., :columns]
    return mask.expand(q.size(0), q.size(1), q.size(2), k.size(2))


def _pad_head(t: torch.Tensor) -> torch.Tensor:
    extra = -t.size(-1) % 8
    return F.pad(t, (0, extra)) if extra else t


def sdpa_as_on_cuda(arch: tuple[int, int], query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                    scale=None, enable_gqa=False) -> tuple[torch.Tensor, Choice]:
    """What torch's CUDA `scaled_dot_product_attention` runs, op for op, for a card of `arch`."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    choice = select_backend(arch, query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, needs_grad)
    if choice.backend == "flash":
        head = query.size(-1)
        og_scale = scale if scale is not None else 1.0 / math.sqrt(head)
        out = aten._scaled_dot_product_flash_attention(_pad_head(query), _pad_head(key), _pad_head(value),
                                                       dropout_p, is_causal, False, scale=og_scale)[0]
        return (out[..., :head] if out.size(-1) != head else out), choice
    mask = _additive(attn_mask, query.dtype)
    if choice.backend == "efficient":
        if enable_gqa and key.size(1) != query.size(1):
            # torch's efficient-attention autograd formula wants one key/value head per query head; counted
            # as key/value repeated per group (attention.cpp's pre_process_group_query_attention_input),
            # the larger of the ways a build may run it
            groups = query.size(1) // key.size(1)
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        if mask is not None:
            mask = _aligned_mask(mask, query, key)
        out = aten._scaled_dot_product_efficient_attention(query, key, value, mask, needs_grad, dropout_p,
                                                           is_causal, scale=scale)[0]
        return out, choice
    out = aten._scaled_dot_product_attention_math(query, key, value, mask, dropout_p, is_causal, None,
                                                  scale=scale, enable_gqa=enable_gqa)[0]
    return out, choice


def _as_autocast_casts(args: tuple) -> tuple:
    """Autocast's cast for SDPA (on its lower-precision list): floating inputs to the autocast dtype.

    The mode sees the call before the dispatcher's autocast does, and the backend ops it calls are not
    on autocast's lists, so the cast is made here, where torch would make it (a model whose rotary
    embedding promotes q and k to float32 hands SDPA float32 tensors that autocast copies to bf16).
    """
    first = args[0]
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return args
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


class CudaAttention(TorchFunctionMode):
    """While active, every SDPA call runs as on a card of `arch`; `choices` counts what the calls chose."""

    def __init__(self, arch: tuple[int, int]) -> None:
        super().__init__()
        self.arch = arch
        self.choices: dict[Choice, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out, choice = sdpa_as_on_cuda(self.arch, *_as_autocast_casts(args), **kwargs)
            self.choices[choice] = self.choices.get(choice, 0) + 1
            return out
        return func(*args, **kwargs)

    def facts(self) -> list[dict[str, Any]]:
        return [{"backend": c.backend, "why": c.why, "calls": n} for c, n in self.choices.items()]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class CudaKernelBuffers(TorchDispatchMode):
    """The buffers CUDA kernels allocate around themselves, which a shape function does not return.

    Pushed above the byte counter, so what it allocates is counted; freed when the kernel returns, as
    the kernel's wrapper frees them.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._scaled_dot_product_flash_attention_backward.default:
            _grad, q, k = args[0], args[1], args[2]  # (batch, heads, seq, head) views
            batch, heads, seq_q, head = q.shape
            seq_k, heads_k = k.size(2), k.size(1)
            wide = dict(dtype=torch.float32, device=q.device)
            held = [torch.empty(batch, heads, _round_up(seq_q, 128), **wide),  # softmax_d
                    torch.empty(batch, _round_up(seq_q, 128), heads,  # dq_accum
                                _round_up(head, 32 if head <= 128 else 64), **wide)]
            if heads_k != heads:  # grouped-query attention: dk, dv for every query head, then summed
                held += [torch.empty(batch, seq_k, heads, head, dtype=q.dtype, device=q.device) for _ in range(2)]
            result = func(*args, **kwargs)
            del held
            return result
        return func(*args, **kwargs)


def arch_of(gpu: str | None) -> tuple[int, int] | None:
    return CARD_ARCH.get(gpu) if gpu else None
