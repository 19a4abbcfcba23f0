"""The values `model.generate` reads, answered for fitprobe's generation trial under fake tensors.

Fake tensors have shapes, not values, and transformers' `generate` asks a few questions of values
(`.item()`, `bool(tensor)`: `aten._local_scalar_dense`). For the trial fitprobe runs — prompts of
non-negative token ids, an all-ones attention mask, `min_new_tokens == max_new_tokens` so no sequence
ends early — every answer is known without the values, and the allocations that follow (the mask
dropped, the loop run to max_length) are the ones the measured trial makes, which the tests hold to the
byte. Each known read is matched by the source of the statement that reads it:

| statement in transformers (generation/utils.py)            | answer                                      |
|-------------------------------------------------------------|---------------------------------------------|
| `torch.isin(eos_token_tensor, pad_token_tensor).any()`      | whether the pad id is one of the EOS ids    |
| `(eos_token_tensor < 0).any()`                              | whether an EOS id is negative               |
| `torch.any(attention_mask[:, -1] == 0)` (right padding?)    | False: the prompts are unpadded             |
| `(encoder_input_ids < 0).any()` (a -100 dummy?)             | False: token ids                            |
| `(model_kwargs["attention_mask"] == 1).all()`               | True: the mask is all ones (so it is dropped) |
| `unfinished_sequences.max() == 0` (the stop check)          | whether the length reached max_length       |

Any other read is refused, naming the statement: a guessed value could change what is allocated, and an
estimate that guesses is not exact (measure instead, or teach this table the new read).
"""

from __future__ import annotations

import linecache
import sys
from types import FrameType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fitprobe.probe.spec import SpecError


def _statement(frame: FrameType) -> str:
    """The source from the line a frame is executing until its brackets close: a condition may span lines."""
    lines: list[str] = []
    depth = 0
    for number in range(frame.f_lineno, frame.f_lineno + 12):
        line = linecache.getline(frame.f_code.co_filename, number).strip()
        lines.append(line)
        depth += sum(line.count(c) for c in "([{") - sum(line.count(c) for c in ")]}")
        if depth <= 0:
            break
    return " ".join(lines)


def _ids(value: Any) -> list[int]:
    return [] if value is None else [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


class GenerateReads(TorchDispatchMode):
    """Answers generate's value reads (the module's table); enter it inside the estimate meter's tracking."""

    def __init__(self, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not torch.ops.aten._local_scalar_dense.default:
            return func(*args, **(kwargs or {}))
        frame = sys._getframe(1)
        while frame is not None and "/transformers/" not in frame.f_code.co_filename:
            frame = frame.f_back
        if frame is None:
            raise SpecError("generate under fake tensors read a value outside transformers: measure it instead "
                            "(leave out --estimate)")
        return self._answer(frame, _statement(frame))

    def _answer(self, frame: FrameType, statement: str) -> bool:
        config = frame.f_locals.get("generation_config")
        if "torch.isin(eos_token_tensor, pad_token_tensor).any()" in statement and config is not None:
            return bool(set(_ids(config.eos_token_id)) & set(_ids(config.pad_token_id)))
        if "(eos_token_tensor < 0).any()" in statement and config is not None:
            return any(i < 0 for i in _ids(config.eos_token_id))
        if "attention_mask[:, -1] == 0" in statement or "(encoder_input_ids < 0).any()" in statement:
            return False
        if '["attention_mask"] == 1).all()' in statement:
            return True
        if "unfinished_sequences.max() == 0" in statement and "length" in frame.f_locals:
            return frame.f_locals["length"] >= self.max_length
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        raise SpecError(f"generate under fake tensors read a value fitprobe cannot answer without it ({where}: "
                        f"{statement[:120]}): measure the generation instead (leave out --estimate), or pin the "
                        "transformers version fitprobe was checked with")
