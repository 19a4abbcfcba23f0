"""The estimate's fast dispatch cache is torch's own, on every op of real steps: the key
(probe/estimate/cache_key.py) and the outputs of its hits (probe/estimate/fast_outputs.py).

The expected key comes from torch's own `FakeTensorMode._prep_args_for_hash`, run beside the fast one on the same
arguments, op by op, with torch's method restored for the call (so its nested calls are torch's too); the expected
output of a hit, from torch's own `_get_output_tensor_from_cache_entry` on the same entry. Families the
fast path was not written against: DeepSeek-V3's latent attention and experts, Gemma 2's sliding window and
soft-capping, Qwen2's tied embeddings, a Llama with grouped-query attention under LoRA and checkpointing, under
QLoRA with paged 8-bit AdamW, and sharded by FSDP2.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fitprobe.probe.estimate import cache_key, fast_outputs
from fitprobe.probe.make_trial import make_trial
from fitprobe.probe.spec import ProbeSpec

_SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, num_hidden_layers=2, tie_word_embeddings=False)
FAMILIES = {
    "llama-gqa": (dict(model_type="llama", **_SMALL), dict(finetuning="lora", gradient_checkpointing=True)),
    "gemma2-sliding": (dict(model_type="gemma2", head_dim=16, sliding_window=16, **{**_SMALL, "tie_word_embeddings": True}),
                       dict(precision="bf16-mixed")),
    "qwen2-tied": (dict(model_type="qwen2", **{**_SMALL, "tie_word_embeddings": True}),
                   dict(precision="bf16-mixed", finetuning="lora", optimizer="adamw_torch")),
    # bitsandbytes' 4-bit weights and paged 8-bit state, FSDP2's DTensors: arguments that take torch's own branch
    "llama-qlora-paged": (dict(model_type="llama", **_SMALL),
                          dict(precision="bf16-mixed", finetuning="lora", quantization="nf4", gradient_checkpointing=True,
                               optimizer="paged_adamw_8bit")),
    "llama-fsdp2": (dict(model_type="llama", **_SMALL), dict(precision="bf16-mixed", sharding="fsdp", num_devices=2)),
    "deepseek_v3-mla-moe": (dict(model_type="deepseek_v3", vocab_size=1000, hidden_size=64, intermediate_size=128,
                                 moe_intermediate_size=32, num_hidden_layers=2, first_k_dense_replace=1,
                                 n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                                 num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512,
                                 tie_word_embeddings=False), dict(precision="fp32")),
}


def _spec(family: str) -> ProbeSpec:
    config, settings = FAMILIES[family]
    return ProbeSpec(model=config, seq_len=32, capacity_bytes="1GiB", mode="estimate", extrapolate=False,
                     **{"precision": "fp32", **settings})


def _what_it_is(tensor: torch.Tensor) -> tuple[object, ...]:
    """Everything a fake tensor carries but its identity; its mode, by identity (the caller's own)."""
    attributes = sorted((name, value) for name, value in vars(tensor).items() if name != "fake_mode")
    return (type(tensor), tensor.shape, tensor.stride(), tensor.dtype, tensor.device, tensor.requires_grad,
            tensor.storage_offset(), tensor.untyped_storage().nbytes(), str(torch._C._dispatch_keys(tensor)),
            attributes, id(tensor.fake_mode))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_ops_fast_key_and_fast_output_are_torchs_own(family, monkeypatch):
    compared = []
    fast = cache_key._prep_args_fast

    def both(original, mode, result, args, state, ids):
        start = len(result)
        fast(original, mode, result, args, state, ids)
        patched = FakeTensorMode._prep_args_for_hash
        FakeTensorMode._prep_args_for_hash = original  # torch's own, nested calls included
        try:
            own: list[object] = []
            original(mode, own, args, state, [])
        finally:
            FakeTensorMode._prep_args_for_hash = patched
        mine = result[start:]
        # 1 == 1.0 == True: the types are in the key so that a cached int output is not a float's
        assert mine == own and [type(v) for v in mine] == [type(v) for v in own], (mine, own)
        compared.append(len(own))

    built = []
    fast_output = fast_outputs._fast_output

    def both_outputs(original, mode, state, entry, key, func, args):
        mine = fast_output(original, mode, state, entry, key, func, args)
        own = original(mode, state, entry, key, func, args)
        if isinstance(own, torch.Tensor) and own is not mine:  # a fresh output (in place: the argument itself)
            assert _what_it_is(mine) == _what_it_is(own), func
            built.append(func)
        return mine

    monkeypatch.setattr(cache_key, "_prep_args_fast", both)
    monkeypatch.setattr(fast_outputs, "_fast_output", both_outputs)
    _, _, trial = make_trial(_spec(family))
    assert trial(2).fits
    # a whole step's ops went through the comparison, tensors and all (a tensor alone puts 40-odd values in a key)
    assert len(compared) > 500 and max(compared) > 40
    # and most of its outputs: the ops that make new tensors, in their dtypes
    assert len(built) > 300 and len(set(built)) > 15
    assert cache_key.fast_key_matches() and fast_outputs.fast_outputs_match()


def test_an_estimate_is_the_same_with_the_fast_cache_and_with_torchs_own(monkeypatch):
    spec = _spec("llama-gqa")
    _, _, trial = make_trial(spec)
    fast = [trial(b).phase_peak_bytes for b in (1, 3)]
    monkeypatch.setattr(cache_key, "fast_key_matches", lambda: False)
    monkeypatch.setattr(fast_outputs, "fast_outputs_match", lambda: False)
    FakeTensorMode.cache_clear()  # no entry made under the fast key answers the other run
    _, _, trial = make_trial(spec)
    assert [trial(b).phase_peak_bytes for b in (1, 3)] == fast


def test_the_fast_cache_is_on_only_inside_an_estimates_tracking():
    own_key, own_output = FakeTensorMode._prep_args_for_hash, FakeTensorMode._get_output_tensor_from_cache_entry
    meter, _, trial = make_trial(_spec("llama-gqa"))
    with meter.tracking():
        assert FakeTensorMode._prep_args_for_hash is not own_key
        assert FakeTensorMode._get_output_tensor_from_cache_entry is not own_output
    trial(1)
    assert FakeTensorMode._prep_args_for_hash is own_key
    assert FakeTensorMode._get_output_tensor_from_cache_entry is own_output


def test_a_torch_whose_key_has_another_layout_keeps_its_own_path(monkeypatch):
    monkeypatch.setattr(cache_key, "_FIELDS", cache_key._FIELDS[:-1])
    cache_key.fast_key_matches.cache_clear()
    try:
        own = FakeTensorMode._prep_args_for_hash
        with cache_key.keyed_fast():
            assert FakeTensorMode._prep_args_for_hash is own
    finally:
        cache_key.fast_key_matches.cache_clear()


def test_a_torch_whose_fake_tensors_carry_other_attributes_keeps_its_own_outputs(monkeypatch):
    # one attribute more on torch's own fresh tensors than the fast path would copy: the probes differ
    read = fast_outputs._read_fresh_attributes
    monkeypatch.setattr(fast_outputs, "_read_fresh_attributes", lambda: (read(), fast_outputs._fresh.pop("constant")))
    fast_outputs.fast_outputs_match.cache_clear()
    try:
        own = FakeTensorMode._get_output_tensor_from_cache_entry
        with fast_outputs.built_fast():
            assert FakeTensorMode._get_output_tensor_from_cache_entry is own
    finally:
        fast_outputs._fresh.clear()
        fast_outputs.fast_outputs_match.cache_clear()
