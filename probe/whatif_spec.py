"""A what-if request as the command line and the service take it, and the job that answers it.

`fitprobe whatif` and `POST /v1/whatif` describe the same table: the fixed part (model, card or
capacity, collation, LoRA rank, headroom), the seq_lens, and the four settings axes in the command
line's words (finetuning, checkpointing, optimizers, precisions). One model holds it so that both build
the same base spec and rows. `precision` alone, as a request named it before the precisions axis, still
works: it is the base's precision, and the rows' precisions default to it (and bf16 beside bf16-mixed).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fitprobe.probe.events import Emit, Phase, ignore, phase
from fitprobe.probe.spec import DEFAULT_PRECISION, MAX_SEQ_LEN, Optimizer, ProbeSpec
from fitprobe.probe.whatif_table import (CHECKPOINTING, FINETUNINGS, OPTIMIZERS, FineTuningWord, Setting,
                                         WhatIfPrecision, default_precisions, settings_grid)

CheckpointingWord = Literal["off", "on"]


class WhatIfSpec(BaseModel):
    """The table: rows are finetuning × checkpointing × precisions × optimizers, columns the seq_lens (all
    estimated)."""

    model_config = ConfigDict(extra="forbid")

    model: str | dict[str, Any] = Field(..., description=ProbeSpec.model_fields["model"].description)
    seq_lens: list[int] = Field(..., min_length=1, description="the table's columns, e.g. [1024, 2048, 4096]")
    gpu: str | None = Field(None, description="plan for this card's memory (its name, as GET /v1/devices' "
                            "cards and `fitprobe whatif --gpu` name them)")
    capacity_bytes: int | str | None = Field(None, description="or the memory a step may use, bytes or e.g. "
                                             "'24GiB'")
    precision: WhatIfPrecision = Field(
        DEFAULT_PRECISION, description="training precision (for fp16-mixed ask bf16-mixed: the memory is the same); "
        "without `precisions`, the rows' precisions are this one, and pure bf16 beside bf16-mixed")
    collation: Literal["padded", "packed"] = Field(
        "padded", description="padded: batches hold padding (an attention mask); packed: no padding, no mask")
    lora_rank: int = Field(8, ge=1, le=1024, description="LoRA rank of the LoRA and QLoRA rows")
    headroom: float = Field(0.1, description="fraction of the capacity the safe micro-batch keeps free")
    finetuning: list[FineTuningWord] = Field(list(FINETUNINGS), min_length=1,
                                             description="rows: full, lora, qlora (LoRA over an nf4 base)")
    checkpointing: list[CheckpointingWord] = Field(["on" if c else "off" for c in CHECKPOINTING], min_length=1,
                                                   description="rows: gradient checkpointing off, on")
    optimizers: list[Optimizer] = Field(list(OPTIMIZERS), min_length=1, description="rows: these optimizers")
    precisions: list[WhatIfPrecision] | None = Field(
        None, min_length=1, description="rows: these precisions (default: `precision`, and bf16 beside bf16-mixed: "
        "pure bf16 weights, how full fine-tuning of a large model fits one card)")
    longest_up_to: int | None = Field(
        None, ge=1, le=MAX_SEQ_LEN, strict=True, description="each row's longest-sequence search stops here "
        "(default: the model's context); the service caps it at its own largest seq_len (FITPROBE_MAX_SEQ_LEN)")

    @field_validator("seq_lens", "finetuning", "checkpointing", "optimizers", "precisions")
    @classmethod
    def _once_each(cls, values: list[Any] | None) -> list[Any] | None:
        if values is None:
            return values
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"name each value once (repeated: {', '.join(repeated)})")
        return values

    def base(self) -> ProbeSpec:
        """What stays fixed across the table, as a probe spec at the shortest seq_len (raises on a bad field)."""
        if self.gpu is None and self.capacity_bytes is None:
            raise ValueError("the what-if table plans for a card: give gpu (a card's name) or capacity_bytes")
        return ProbeSpec(model=self.model, seq_len=min(self.seq_lens), mode="estimate", gpu=self.gpu,
                         # a string ('24GiB') is parsed by ProbeSpec's before-validator `_capacity_units`; the
                         # pydantic mypy plugin types a strict field's argument by its annotation alone, blind
                         # to before-validators (pydantic/pydantic#12224), hence the one ignore
                         capacity_bytes=self.capacity_bytes,  # type: ignore[arg-type]
                         precision=self.precision, collation=self.collation,
                         lora={"rank": self.lora_rank}, headroom=self.headroom)

    def row_precisions(self) -> list[str]:
        return list(self.precisions) if self.precisions is not None else default_precisions(self.precision)

    def settings(self) -> list[Setting]:
        return settings_grid(self.finetuning, [word == "on" for word in self.checkpointing], self.optimizers,
                             self.row_precisions())

    @property
    def cell_count(self) -> int:
        """settings × seq_lens: what the request costs (each row adds its longest-sequence search)."""
        return (len(self.finetuning) * len(self.checkpointing) * len(self.optimizers) * len(self.row_precisions())
                * len(self.seq_lens))


def run_whatif_job(spec: WhatIfSpec, emit: Emit = ignore, allowed_factories: Collection[str] = ()
                   ) -> dict[str, Any]:
    """The service's what-if job: the table as a dict, one `whatif_cell` event per cell on the way."""
    from fitprobe.probe.whatif import run_whatif  # torch: only a job process fills the table

    emit(phase(Phase.ESTIMATING))
    return run_whatif(spec.base(), spec.seq_lens, spec.settings(), emit, allowed_factories,
                      spec.longest_up_to).to_dict()
