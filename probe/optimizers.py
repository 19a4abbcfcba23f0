"""The optimizer a user's framework runs, by the name they write there (HF `TrainingArguments.optim`).

At small micro-batches the optimizer step holds the peak, and there the implementation decides it:
torch's single-tensor AdamW (its CPU default) keeps two temporaries the size of the largest parameter,
the foreach one (its CUDA default) one temporary the size of *all* trained parameters, the fused one
none. HF Trainer's default `adamw_torch_fused` is the last, so probing with `torch.optim.AdamW()`'s
defaults overstated a full fine-tune by an fp32 copy of the weights on a GPU. Each name here builds
exactly what `transformers.Trainer` builds for it (`trainer_optimizer.py`: the same class and keyword
arguments), with the one choice torch would make by device stated explicitly: an estimate is for a CUDA
card, so it runs what CUDA runs even on a CPU-only host.

Under an 8-bit bitsandbytes optimizer the Trainer's `create_optimizer` registers every `nn.Embedding` weight
for 32-bit state (`GlobalOptimManager.register_module_override(module, "weight", {"optim_bits": 32})`):
token embeddings are the largest trained matrix of most models, and an 8-bit build that forgot them was
6 bytes per embedding parameter under the Trainer (15-18 % of a small model's peak).

The Trainer puts the parameters in two groups (decayed weights, then biases and norms), both with weight
decay 0.0 by default; Adafactor gets them here too (its per-parameter temporaries make the order part of the
peak), the others stay one group in the model's order. Only torch's foreach loop sees the
difference (it runs once per group, so its temporary is the larger group's, not all parameters'): one
group over-counts `adamw_torch` on CUDA by the bytes of the biases and norms, never under. One group keeps
per-parameter optimizers (bitsandbytes) updating in the model's order, which the estimate's
extrapolation from shallow cuts relies on (probe/estimate/extrapolate.py).

bitsandbytes' paged optimizers keep large states in CUDA unified memory, outside torch's allocator; the
driver may evict them to host memory under pressure. fitprobe counts them as device memory (the
worst case: nothing evicted), and says so in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from fitprobe.probe.bnb import import_bitsandbytes
from fitprobe.probe.spec import ProbeSpec, SpecError

if TYPE_CHECKING:  # torch only where an optimizer is built: exports and the CLI's help name them without it
    import torch
    from torch import nn

DeviceType = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class OptimizerKind:
    """One name a user writes, and what it runs."""

    name: str
    description: str
    library: Literal["torch", "transformers", "bitsandbytes"]
    paged: bool = False
    bits: int = 32


KINDS: dict[str, OptimizerKind] = {kind.name: kind for kind in (
    OptimizerKind("adamw_torch_fused", "AdamW, fused kernel (HF Trainer's default): two fp32 states, no temporaries",
                  "torch"),
    OptimizerKind("adamw_torch", "plain torch.optim.AdamW: foreach on CUDA (a temporary the size of all trained "
                  "parameters), single-tensor on CPU", "torch"),
    OptimizerKind("adamw_bnb_8bit", "bitsandbytes AdamW with 8-bit blockwise states", "bitsandbytes", bits=8),
    OptimizerKind("adamw_8bit", "bitsandbytes AdamW with 8-bit blockwise states (HF's alias of adamw_bnb_8bit)",
                  "bitsandbytes", bits=8),
    OptimizerKind("paged_adamw_8bit", "bitsandbytes paged AdamW, 8-bit states in unified memory", "bitsandbytes",
                  paged=True, bits=8),
    OptimizerKind("paged_adamw_32bit", "bitsandbytes paged AdamW, 32-bit states in unified memory", "bitsandbytes",
                  paged=True),
    OptimizerKind("lion_8bit", "bitsandbytes Lion, one 8-bit state", "bitsandbytes", bits=8),
    OptimizerKind("lion_32bit", "bitsandbytes Lion, one 32-bit state", "bitsandbytes"),
    OptimizerKind("adafactor", "transformers' Adafactor (factored second moment, no first moment), "
                  "scale_parameter=False, relative_step=False as HF Trainer sets it", "transformers"),
    OptimizerKind("sgd", "torch.optim.SGD as HF's `sgd`: no momentum, so no state", "torch"),
)}
# HF's defaults for the Adam family (TrainingArguments adam_beta1/2, adam_epsilon, weight_decay)
ADAM_BETAS, ADAM_EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 0.0
EMBEDDING_NOTE = "nn.Embedding weights keep 32-bit state, as HF Trainer registers them with bitsandbytes"


def device_type_of(spec: ProbeSpec) -> DeviceType:
    """Where the step is meant to run: an estimate always plans for a CUDA card."""
    return "cuda" if spec.mode == "estimate" or spec.device.startswith("cuda") else "cpu"


def implementation(name: str, device_type: DeviceType) -> str:
    """The exact implementation a trial runs, in words the report carries."""
    if name == "adamw_torch_fused":
        return "torch.optim.AdamW(fused=True)"
    if name == "adamw_torch":
        return "torch.optim.AdamW(foreach=True)" if device_type == "cuda" else "torch.optim.AdamW(foreach=False)"
    if name == "sgd":
        return "torch.optim.SGD(momentum=0)"
    if name == "adafactor":
        return "transformers.optimization.Adafactor(scale_parameter=False, relative_step=False)"
    kind = KINDS[name]
    family = "Lion" if name.startswith("lion") else "AdamW"
    return f"bitsandbytes.optim.{family}(optim_bits={kind.bits}, is_paged={kind.paged})"


def report_facts(spec: ProbeSpec) -> dict[str, str | None]:
    """What the report says about the optimizer: the name, the exact implementation, and for paged ones
    how their state was counted."""
    device_type = device_type_of(spec)
    kind = KINDS[spec.optimizer]
    notes = [EMBEDDING_NOTE] if kind.library == "bitsandbytes" and kind.bits == 8 else []
    if kind.paged:
        notes.append("paged optimizer state is counted as device memory: the driver may move it to host memory "
                     "under pressure, so the real peak can be lower, never higher")
    note = "; ".join(notes) or None
    return {"name": spec.optimizer, "implementation": implementation(spec.optimizer, device_type),
            "runs_on": device_type, "note": note}


def _bitsandbytes() -> ModuleType:
    return import_bitsandbytes("8-bit and paged optimizers (or pick optimizer adamw_torch_fused)")


def import_optimizer(name: str) -> None:
    """Import the framework `name`'s optimizer lives in, before a trial's tensors exist (probe/trial.py).

    An import inside a trial keeps that trial's tensors alive wherever the import leaves a reference to the
    frames running it: bitsandbytes logs an exception when it imports (transformers' Adafactor imports it
    through peft), and a process that keeps log records (pytest's capture, a MemoryHandler) keeps the
    exception's traceback, its frames and their locals, the trial's batches among them. Every later trial
    on that model then counts them, and an estimate extrapolated from two cuts counts them twice.
    """
    library = KINDS[name].library if name in KINDS else None
    if library == "transformers":
        import transformers.optimization  # noqa: F401
    elif library == "bitsandbytes":
        _bitsandbytes()


def make_optimizer(name: str, module: nn.Module, lr: float, device_type: DeviceType) -> torch.optim.Optimizer:
    """Build the optimizer `name` names for `module`'s trained parameters, as HF Trainer builds it, for a
    device of `device_type`.

    `device_type` is where the step is meant to run, not where these tensors live: an estimate's fake
    tensors sit on the CPU but stand for a CUDA card, so `adamw_torch` gets CUDA's foreach loop.
    """
    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    params = [p for p in module.parameters() if p.requires_grad]
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY, fused=True)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY,
                                 foreach=device_type == "cuda")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(_trainer_groups(module), lr=lr, scale_parameter=False, relative_step=False)
    kind = KINDS.get(name)
    if kind is None:
        raise SpecError(f"optimizer: unknown {name!r}; choose one of {', '.join(KINDS)}")
    optim = _bitsandbytes().optim
    cls = optim.Lion if name.startswith("lion") else optim.AdamW
    extra = {} if name.startswith("lion") else {"eps": ADAM_EPS, "weight_decay": WEIGHT_DECAY}
    # the constructor computes its quantization maps with data-dependent ops, which fake tensors cannot
    # run; the maps are 256 floats made outside any mode and moved to the parameters' device on first use
    with _disable_current_modes():
        optimizer = cls(params, lr=lr, betas=ADAM_BETAS, optim_bits=kind.bits, is_paged=kind.paged, **extra)
    if kind.bits == 8:
        _embeddings_in_32_bits(optimizer, module)
    return optimizer


def _trainer_groups(module: nn.Module) -> list[dict[str, Any]]:
    """The Trainer's two parameter groups (decayed weights, then biases and norms; both decay 0.0 by default).

    For Adafactor, whose update makes per-parameter temporaries while its state accumulates, the order is
    part of the peak: in the model's order it was 0.8 % under the Trainer's on qwen3 (tests/test_optimizers.py).
    Adafactor never extrapolates from cuts, so the grouping costs the estimate nothing.
    """
    from transformers import Trainer

    decayed = set(Trainer.get_decay_parameter_names(None, module))  # type: ignore[arg-type]  # no use of self
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n in decayed], "weight_decay": WEIGHT_DECAY},
            {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0}]


def _embeddings_in_32_bits(optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    """What `Trainer.create_optimizer` does under an 8-bit bitsandbytes optimizer: every nn.Embedding weight
    gets 32-bit state, applied by bitsandbytes itself at the first step (`check_overrides`).

    The Trainer registers the modules with bitsandbytes' process-wide manager, which keeps every module
    alive for the life of the process; a manager of this optimizer's own reads the same registrations
    and lets each trial's model go.
    """
    from torch import nn

    manager_cls = _bitsandbytes().optim.GlobalOptimManager
    manager = manager_cls.__new__(manager_cls)
    manager.initialize()
    for embedding in (m for m in module.modules() if isinstance(m, nn.Embedding)):
        manager.register_module_override(embedding, "weight", {"optim_bits": 32})
    optimizer.mng = manager  # type: ignore[attr-defined]  # bitsandbytes' Optimizer8bit reads it


def paged_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of state bitsandbytes put in CUDA unified memory, which torch's allocator never sees.

    On CPU (and under fake tensors) bitsandbytes allocates paged states as ordinary tensors, which the
    meter already counts; there this is 0.
    """
    import torch

    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and getattr(t, "is_paged", False))
