"""The builtin GPTs' sizes (probe/models/builtin_gpt.py builds them): data only, so the door and the service's
model list name them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 1024
    block_size: int = 2048
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128


BUILTIN_CONFIGS: dict[str, GPTConfig] = {
    "gpt-nano": GPTConfig(vocab_size=512, n_layer=1, n_head=2, n_embd=64),
    "gpt-tiny": GPTConfig(vocab_size=1024, n_layer=2, n_head=4, n_embd=128),
    "gpt-small": GPTConfig(vocab_size=4096, n_layer=4, n_head=4, n_embd=256),
    "gpt-base": GPTConfig(vocab_size=8192, n_layer=6, n_head=8, n_embd=512),
}
