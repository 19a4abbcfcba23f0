"""A factory an operator could allow-list: any callable returning a module with `vocab_size`."""

import os
import tempfile
import time

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


def scratch_writing_lm() -> nn.Module:
    """Leaves a temporary file, as compilers and rank protocols do, then works a while (so a test can cancel it)."""
    handle, _ = tempfile.mkstemp(prefix="left-by-the-job-")
    os.close(handle)
    time.sleep(60)
    return TinyMlpLM()
