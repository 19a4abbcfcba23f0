"""The step as each trainer runs it: `hf` (transformers Trainer) and `trl` (TRL's SFTTrainer).

The two differ in the loss head, which at long sequences and large vocabularies is the biggest
per-example term. The Trainer lets the model compute its own loss over the full `[tokens, vocab]`
logits (probe/step.py's `token_loss_sum`). SFTTrainer, with its default `loss_type="nll"`, adds a
fused LM head (`trl.trainer.utils.add_fused_lm_head`) and calls the model with `fused_lm_head=True`:
the hidden states are projected through the LM head in tiles of 4096 tokens × 32768 vocabulary
columns, each tile folded into running log-sum-exp statistics and dropped, so the logits never
exist; backward recomputes each tile. Both the patch and the call below are TRL's own code, so the
buffers counted are the ones SFTTrainer allocates: on a CPU host its torch path (every position
scored, tiles as wide as 32768 columns even for a smaller vocabulary).

Known limitations: on CUDA, TRL scores only the labelled positions and folds tiles in Triton kernels;
a CPU-only host runs the torch path, so an estimate for a card counts the CPU path's tiles (the same
tile buffer, plus the torch fold's temporaries, which the Triton fold does not allocate, and every
position where the card scores the labelled ones): more than the card holds, by reading of TRL's code,
not yet checked on a card. Under fake CUDA tensors (an estimate on a CUDA host) TRL's path picks the
labelled positions by value, which fake tensors do not have: refused with a message. SFTTrainer's
metrics (entropy, token accuracy) are scalars read after the loss and are not run here: they read
values, which fake tensors do not have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from fitprobe.probe.spec import ProbeSpec, SpecError
from fitprobe.probe.versions import distribution_version
from fitprobe.probe.liger import apply_liger

if TYPE_CHECKING:
    from transformers import PreTrainedModel

IGNORE_INDEX = -100
# the per-token fields SFTTrainer asks its fused head for (`is_top1` feeds mean_token_accuracy)
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")


def _base_model(module: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper: where SFTTrainer adds the head and Liger patches."""
    get_base_model = getattr(module, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else module


def adapt(module: nn.Module, spec: ProbeSpec) -> None:
    """Patch a built model as the spec's trainer does before training starts.

    SFTTrainer adds its fused head after PEFT wraps the model, to the base model; with `--liger`,
    Trainer applies `apply_liger_kernel` (transformers' own integration) with the config the trainer
    sets: SFTTrainer turns Liger's fused linear cross-entropy off, since it would replace the fused head.
    """
    if spec.liger:
        apply_liger(module, fused_linear_cross_entropy=spec.trainer == "hf")
    if spec.trainer == "trl":
        from trl.trainer.utils import add_fused_lm_head

        # ProbeSpec takes trainer trl for transformers models only
        add_fused_lm_head(cast("PreTrainedModel", _base_model(module)), outputs=SFT_OUTPUTS)


def unshifted_labels(shifted: torch.Tensor) -> torch.Tensor:
    """Labels as TRL's collator makes them (the token itself; -100 at each row's first token), from
    fitprobe's next-token labels: the fused head shifts them itself (`labels[:, 1:]`)."""
    first = torch.full_like(shifted[:, :1], IGNORE_INDEX)
    return torch.cat([first, shifted[:, :-1]], dim=1)


def token_loss_sum(module: nn.Module, spec: ProbeSpec, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> torch.Tensor:
    """The sum of the token losses as the spec's trainer computes them, where the model computes the loss.

    trl: SFTTrainer.compute_loss with loss_type nll, the model called with `fused_lm_head=True`, the token
    losses `-log_probs` (zero where ignored) summed. hf with Liger: the Trainer's call with labels, which
    Liger's patched forward turns into its fused linear cross-entropy (no logits returned in training);
    `num_items_in_batch=1` makes its loss the token sum. The step divides by the step's token count for
    every trainer, as both trainers do with `num_items_in_batch`.
    """
    kwargs: dict[str, torch.Tensor] = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if spec.trainer == "trl":
        if input_ids.device.type == "cuda" and isinstance(input_ids, FakeTensor):
            # TRL's CUDA path indexes the labelled positions (a data-dependent shape) and runs Triton tiles
            raise SpecError("trainer trl under fake CUDA tensors is not modelled (TRL's Triton path picks the "
                            "labelled positions by value): estimate on a CPU-only host, which counts TRL's torch "
                            "path (more temporaries per tile than its Triton path), or measure on the card")
        outputs = module(input_ids=input_ids, labels=unshifted_labels(labels), fused_lm_head=True, use_cache=False,
                         **kwargs)
        per_token_loss = -outputs.log_probs
        return per_token_loss.sum()
    return module(input_ids=input_ids, labels=unshifted_labels(labels), use_cache=False, num_items_in_batch=1,
                  **kwargs).loss



def report_facts(spec: ProbeSpec) -> dict[str, Any] | None:
    """What the report says about the trainer's step: its loss head, its defaults, what fitprobe followed.

    None for the plain HF Trainer step without Liger, whose report needs no word beyond the spec.
    """
    if spec.trainer == "hf" and not spec.liger:
        return None
    facts: dict[str, Any] = {"trainer": "TRL SFTTrainer (loss_type nll)" if spec.trainer == "trl"
                             else "transformers Trainer"}
    if spec.trainer == "trl":
        facts["loss_head"] = ("trl.trainer.utils.add_fused_lm_head: the LM head in tiles of 4096 tokens x 32768 "
                              "columns, the logits never built; on this host TRL's torch path (every position "
                              "scored), on CUDA its Triton path scores labelled positions only")
        facts["note"] = ("SFTConfig defaults gradient_checkpointing=True and bf16=True: fitprobe followed "
                         f"gradient_checkpointing={spec.gradient_checkpointing} and precision {spec.precision}; "
                         "--format trl writes both")
        facts["trl_version"] = distribution_version("trl")
    if spec.liger:
        facts["liger"] = ("apply_liger_kernel (RMSNorm, RoPE, SwiGLU" + (", fused linear cross-entropy)"
                          if spec.trainer == "hf" else "; SFTTrainer turns its fused linear cross-entropy off)")
                          + ": Liger's host code under fake tensors, its Triton launches skipped")
        facts["liger_kernel_version"] = distribution_version("liger-kernel")
    return facts
