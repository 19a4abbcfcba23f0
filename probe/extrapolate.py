"""Estimate a deep decoder from two shallow cuts of it: seconds where the full depth takes minutes.

A decoder repeats one block, or a short pattern of blocks (Gemma's sliding and global layers, an
MoE's dense and sparse ones). At every moment of the training step it holds what the embeddings,
head and loss hold, plus the same bytes for every repetition of the pattern: each block's weights,
gradients and optimizer state, and the activations it saved for backward. So each phase's peak is a
line in the number of repetitions, and two cuts of the stack fix that line. The cuts keep the
layers the full stack starts with (a dense prefix, then the pattern once or twice, then the
pattern's first `rest` layers that the full stack ends on), so they hold exactly the layers of the
full stack minus whole repetitions, and the extrapolation multiplies by a whole number.

Nothing here assumes a pattern: each layer's structure (its modules' types, parameter shapes and
dtypes, and plain attributes such as `attention_type` or `sliding_window`) is read from the model
built on the meta device, the pattern is found in that list, and each cut is checked to hold the
full stack's first layers and the same modules around them. Families whose extrapolated estimate
was compared with the full depth to the byte (tests/test_extrapolate.py) are extrapolated; any
other model runs at full depth, and the report says why.

The cuts run uncapped; the extrapolated peak is then compared with the capacity, which is the
full-depth trial's verdict (the byte counter raises exactly when the live bytes pass the capacity).

Where it is not exact: a phase's peak is the largest of the live bytes at each moment of the phase,
and each moment's bytes are a line in the depth, so the peak is a maximum of lines (convex). At
small micro-batches in full fine-tuning, the moment that holds the peak of the shallow cuts (the
start of backward, with the logits' gradient) is overtaken at full depth by one that grows faster
per layer, and the line through the cuts underestimates (tests/test_extrapolate.py shows cases).
Hence off by default (`ProbeSpec.extrapolate`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from probe.spec import MAX_CAPACITY_BYTES, ProbeSpec, SpecError, format_bytes
from probe.trial import TrialError, TrialResult

# compared with the full depth to the byte, per phase, with LoRA, mixed precision and checkpointing
VERIFIED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2",
                                  "mixtral", "qwen2_moe", "qwen3_moe"})
_PLAIN = (bool, int, float, str, type(None))
# attributes that differ between layers without changing what they allocate
_POSITION_ATTRIBUTES = frozenset({"layer_idx", "layer_id"})

Trial = Callable[[int], TrialResult]


@dataclass(frozen=True)
class Cuts:
    """The full stack is `prefix` layers, `period`-layer repetitions, then `rest` layers of one more."""

    full_layers: int
    prefix: int
    period: int
    rest: int

    @property
    def depths(self) -> tuple[int, int]:
        shallow = self.prefix + self.period + self.rest
        return shallow, shallow + self.period

    @property
    def repeats(self) -> int:
        """How many times the deeper cut's extra repetition is added to the shallower cut to reach full depth."""
        return (self.full_layers - self.depths[0]) // self.period


def find_pattern(signatures: Sequence[Hashable]) -> tuple[int, int] | None:
    """(prefix, period) whose cuts are shallowest: `signatures[prefix:]` repeats every `period` layers.

    None when no pattern leaves the deeper cut (prefix + 2 periods + rest) shallower than the stack.
    """
    ids: dict[Hashable, int] = {}
    layers = [ids.setdefault(s, len(ids)) for s in signatures]
    n = len(layers)
    best: tuple[int, int] | None = None
    best_depth = n
    for prefix in range(n):
        if prefix + 2 >= best_depth:
            break
        tail = layers[prefix:]
        for period in range(1, len(tail) // 3 + 1):
            if prefix + 2 * period >= best_depth:
                break
            if all(tail[i] == tail[i + period] for i in range(len(tail) - period)):
                depth = prefix + 2 * period + len(tail) % period
                if depth < best_depth:
                    best, best_depth = (prefix, period), depth
                break
    return best


def extrapolate_peaks(shallow: dict[str, int], deep: dict[str, int], repeats: int) -> dict[str, int]:
    """Each phase's peak at full depth: the shallow cut's plus `repeats` times what one more repetition adds."""
    if shallow.keys() != deep.keys():
        raise TrialError(f"the cuts' steps went through different phases ({sorted(shallow)} and {sorted(deep)}); "
                         "estimate with extrapolate off")
    return {phase: shallow[phase] + repeats * (deep[phase] - shallow[phase]) for phase in shallow}


def _module_signature(module: nn.Module) -> tuple:
    plain = tuple(sorted((k, v) for k, v in vars(module).items()
                         if not k.startswith("_") and k not in _POSITION_ATTRIBUTES and isinstance(v, _PLAIN)))
    tensors = tuple((name, tuple(t.shape), t.dtype, t.requires_grad)
                    for store in (module._parameters, module._buffers) for name, t in store.items() if t is not None)
    return type(module).__qualname__, plain, tensors


def _signature(module: nn.Module, skip: str | None = None) -> tuple:
    """Everything about `module` that decides what it allocates, leaving out the subtree named `skip`."""
    return tuple((name, _module_signature(m)) for name, m in module.named_modules()
                 if skip is None or not (name == skip or name.startswith(skip + ".")))


def _layer_stack(module: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList] | None:
    """The outermost list of `n_layers` modules: the decoder's repeated blocks."""
    return next(((name, m) for name, m in module.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) == n_layers), None)


def _layer_count_key(config: Any) -> str:
    return type(config).attribute_map.get("num_hidden_layers", "num_hidden_layers")


def _cut_spec(spec: ProbeSpec, model_type: str, fields: dict[str, Any], config: Any, depth: int) -> ProbeSpec:
    """The spec with the stack cut to its first `depth` layers, uncapped (the full depth is compared later)."""
    fields = {k: v for k, v in fields.items() if k not in ("num_hidden_layers", _layer_count_key(config))}
    fields[_layer_count_key(config)] = depth
    if isinstance(getattr(config, "layer_types", None), list):
        fields["layer_types"] = list(config.layer_types[:depth])
    return spec.model_copy(update={"model": {"model_type": model_type, **fields}, "capacity_bytes": MAX_CAPACITY_BYTES,
                                   "gpu": None, "extrapolate": False})


def plan_cuts(spec: ProbeSpec, full: nn.Module, allowed_factories: Collection[str] = ()
              ) -> tuple[Cuts, list[ProbeSpec]] | str:
    """The cuts and their specs, or why the full depth must run. `full` is the model built on meta."""
    from probe.models import _hf_config, _reference_fields, build_model

    if not spec.extrapolate:
        return "extrapolate is off (--extrapolate turns it on)"
    if spec.sharding != "none":
        return "sharding=fsdp: extrapolation was compared with the full depth on one device only"
    if spec.quantization != "none":
        return f"quantization {spec.quantization}: extrapolation was not compared with the full depth for it"
    if isinstance(spec.model, str) and spec.model.startswith(("builtin:", "factory:")):
        return "only Hugging Face decoders (preset:, hf:, inline configs) have a layer count to cut"
    model_type, fields = _reference_fields(spec.model)
    if model_type not in VERIFIED_MODEL_TYPES:
        return (f"model_type {model_type}: its extrapolated estimate was not compared with the full depth "
                f"(verified: {', '.join(sorted(VERIFIED_MODEL_TYPES))})")
    config = _hf_config(model_type, dict(fields))
    n_layers = getattr(config, "num_hidden_layers", None)
    found = _layer_stack(full, n_layers) if isinstance(n_layers, int) else None
    if found is None:
        return f"no stack of num_hidden_layers={n_layers} layers found in the model"
    stack_name, stack = found
    layers = [_signature(layer) for layer in stack]
    pattern = find_pattern(layers)
    if pattern is None:
        return (f"{n_layers} layers: no repeating pattern of layers leaves two cuts shallower than the model, "
                "so they would cost as much as the full depth")
    prefix, period = pattern
    cuts = Cuts(n_layers, prefix, period, (n_layers - prefix) % period)
    specs = [_cut_spec(spec, model_type, fields, config, depth) for depth in cuts.depths]
    around = _signature(full, skip=stack_name)
    for depth, cut_spec in zip(cuts.depths, specs):
        cut = build_model(cut_spec, "meta", allowed_factories).module
        cut_stack = _layer_stack(cut, depth)
        if (cut_stack is None or [_signature(layer) for layer in cut_stack[1]] != layers[:depth]
                or _signature(cut, skip=cut_stack[0]) != around):
            return f"the model cut to {depth} layers is not the full model's first {depth} layers"
    return cuts, specs


class ExtrapolatedTrial:
    """`trial(b)`: THE estimate trial on both cuts, each phase's peak extrapolated to full depth and capped."""

    def __init__(self, cuts: Cuts, shallow: Trial, deep: Trial, capacity_bytes: int) -> None:
        self.cuts = cuts
        self.shallow, self.deep = shallow, deep
        self.capacity_bytes = capacity_bytes

    def __call__(self, micro_batch: int) -> TrialResult:
        shallow, deep = self.shallow(micro_batch), self.deep(micro_batch)
        if not (shallow.fits and deep.fits):
            raise TrialError(f"the cut model did not run at micro-batch {micro_batch}: {shallow.error or deep.error}")
        phases = extrapolate_peaks(shallow.phase_peak_bytes, deep.phase_peak_bytes, self.cuts.repeats)
        peak_bytes = max(phases.values())
        if peak_bytes > self.capacity_bytes:
            return TrialResult(micro_batch, False, error=f"out of memory: the step's extrapolated peak "
                               f"{format_bytes(peak_bytes)} is more than the capacity {format_bytes(self.capacity_bytes)}")
        return TrialResult(micro_batch, True, peak_bytes, peak_bytes, 0, None, phases)


def extrapolated_trial(spec: ProbeSpec, allowed_factories: Collection[str], make_trial: Callable
                       ) -> tuple[Any, dict[str, Any], Trial] | str:
    """(meter, the full model's facts, trial) for an estimate from two cuts, or why the full depth must run.

    `make_trial` is probe.job's, run on each cut spec (which has extrapolate off).
    """
    from probe.estimate import EstimateMeter
    from probe.job import attention_facts, model_facts
    from probe.models import build_model

    if spec.mode != "estimate":
        raise SpecError("extrapolation is for estimate mode: a measured trial runs the real model")
    full = build_model(spec, "meta", allowed_factories, spec.capacity_bytes)  # refuses weights past the capacity
    planned = plan_cuts(spec, full.module, allowed_factories)
    if isinstance(planned, str):
        return planned
    cuts, specs = planned
    facts = {**model_facts(full), "attention": attention_facts(full, spec),
             "extrapolated_from_layers": list(cuts.depths)}
    del full
    (_, _, shallow), (_, _, deep) = (make_trial(cut, allowed_factories) for cut in specs)
    return EstimateMeter(spec.capacity_bytes), facts, ExtrapolatedTrial(cuts, shallow, deep, spec.capacity_bytes)
