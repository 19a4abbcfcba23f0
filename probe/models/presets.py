"""Architecture configs of well-known models, copied from their published config.json files.

Memory needs shapes, not weights: fitprobe builds these with random weights, so nothing is
downloaded. Each entry is (transformers model_type, config fields), with the fields that decide a
shape or the context length; rope scaling is left out (it changes no tensor's size). The comment
above each entry names the Hub repository its config.json comes from.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)),
    "gpt2-medium": (
        "gpt2", dict(vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16)
    ),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": ("llama", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )),
    # meta-llama/Llama-3.2-3B
    "llama-3.2-3b": ("llama", dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": ("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )),
    # mistralai/Mistral-7B-v0.3
    "mistral-7b": ("mistral", dict(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )),
    # mistralai/Mistral-Nemo-Base-2407 (head_dim 128, not hidden_size / heads = 160)
    "mistral-nemo-12b": ("mistral", dict(
        vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=1024000,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )),
    # Qwen/Qwen2.5-0.5B
    "qwen2.5-0.5b": ("qwen2", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
    )),
    # Qwen/Qwen2.5-1.5B
    "qwen2.5-1.5b": ("qwen2", dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
        rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
    )),
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": ("qwen2", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
        rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-6,
    )),
    # Qwen/Qwen2.5-14B
    "qwen2.5-14b": ("qwen2", dict(
        vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )),
    # google/gemma-2-2b
    "gemma-2-2b": ("gemma2", dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
    )),
    # google/gemma-2-9b
    "gemma-2-9b": ("gemma2", dict(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, max_position_embeddings=8192,
        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
    )),
    # microsoft/Phi-3.5-mini-instruct (fused qkv_proj and gate_up_proj; its longrope factors change no shape)
    "phi-3.5-mini": ("phi3", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
        original_max_position_embeddings=4096, sliding_window=262144, rope_theta=10000.0,
        tie_word_embeddings=False, rms_norm_eps=1e-5, pad_token_id=32000,
    )),
    # Qwen/Qwen3-0.6B (q_norm and k_norm per layer; head_dim 128, not hidden_size / heads = 64)
    "qwen3-0.6b": ("qwen3", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, sliding_window=None, use_sliding_window=False, tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )),
    # Qwen/Qwen3-8B
    "qwen3-8b": ("qwen3", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, sliding_window=None, use_sliding_window=False, tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )),
    # meta-llama/Llama-3.3-70B-Instruct
    "llama-3.3-70b": ("llama", dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )),
    # mistralai/Mistral-Small-24B-Base-2501 (head_dim 128, not hidden_size / heads = 160)
    "mistral-small-3": ("mistral", dict(
        vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        rope_theta=100000000.0, sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )),
    # google/gemma-3-1b-pt (text only; five sliding-window layers of 512 tokens to each global one; the
    # config leaves tie_word_embeddings to Gemma3TextConfig's default, True)
    "gemma-3-1b": ("gemma3_text", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
        query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, final_logit_softcapping=None, attn_logit_softcapping=None,
        tie_word_embeddings=True, rms_norm_eps=1e-6,
    )),
    # microsoft/phi-4 (the Phi-3 architecture: fused qkv_proj and gate_up_proj, 40 heads over 10 kv heads)
    "phi-4": ("phi3", dict(
        vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=10, max_position_embeddings=16384,
        original_max_position_embeddings=16384, sliding_window=None, rope_theta=250000.0,
        tie_word_embeddings=False, rms_norm_eps=1e-5, pad_token_id=100349,
    )),
    # Mixture of experts: every expert's weights are held, top-k of them run per token.
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": ("mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        num_local_experts=8, num_experts_per_tok=2, rope_theta=1000000.0, sliding_window=None,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    )),
    # Qwen/Qwen3-30B-A3B (128 routed experts in every layer, 8 per token, no shared expert; its
    # intermediate_size is unused because no layer is dense)
    "qwen3-30b-a3b": ("qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
        mlp_only_layers=[], norm_topk_prob=True, rope_theta=1000000.0, sliding_window=None,
        use_sliding_window=False, tie_word_embeddings=False, rms_norm_eps=1e-6,
    )),
    # Qwen/Qwen1.5-MoE-A2.7B (60 routed experts, 4 per token, plus one always-on shared expert)
    "qwen1.5-moe-a2.7b": ("qwen2_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=8192,
        num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, decoder_sparse_step=1, norm_topk_prob=False,
        rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-6,
    )),
}
