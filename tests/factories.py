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


# A probe of it runs about 20 forwards (5 search trials of 4, or 3 trials and a verification): ~30 s, all asleep.
# A service started with SLEEPY_LM_SLEEP_S in its environment runs it that much faster (its jobs read it when they
# import this module): a test that restarts a service only to see the job finish there lets the rerun hurry.
SLEEP_PER_FORWARD_S = float(os.environ.get("SLEEPY_LM_SLEEP_S", "1.5"))


class SleepyLM(TinyMlpLM):
    """Slow by sleeping, not by computing: a job that is still running when a test cancels, kills or restarts
    around it, without taking the CPU from the tests running beside it (a real model that slow burns ~10 s of
    CPU on the 2-core CI host before the test ends it). Its report is a tiny model's, and it ends in bounded
    time, so a test can also wait for it to finish."""

    def forward(self, input_ids):
        time.sleep(SLEEP_PER_FORWARD_S)
        return super().forward(input_ids)


def sleepy_lm() -> nn.Module:
    return SleepyLM()


def scratch_writing_lm() -> nn.Module:
    """Leaves a temporary file, as compilers and rank protocols do, then works a while (so a test can cancel it)."""
    handle, _ = tempfile.mkstemp(prefix="left-by-the-job-")
    os.close(handle)
    time.sleep(60)
    return TinyMlpLM()
