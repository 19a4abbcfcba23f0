"""A factory an operator could allow-list: any callable returning a module with `vocab_size`."""

from torch import nn


class TinyMlpLM(nn.Module):
    vocab_size = 64

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(self.vocab_size, 16)
        self.head = nn.Linear(16, self.vocab_size)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids))


def tiny_mlp_lm() -> nn.Module:
    return TinyMlpLM()
