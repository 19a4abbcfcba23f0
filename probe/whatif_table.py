"""The what-if table as data: its rows' settings, its cells, and the text that shows it.

probe/whatif.py fills the table (each cell an estimate); this module is what the request (probe/whatif_spec.py),
the service's response model and the command line read of it, without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fitprobe.probe.spec import DEFAULT_PRECISION, ESTIMATED, Optimizer, SpecError, format_bytes

SEQ_GRID = 256  # the longest-sequence answer is a multiple of this (or the model's context)


FineTuningWord = Literal["full", "lora", "qlora"]  # a row's finetuning: QLoRA is LoRA over an nf4 base
# fp16-mixed is not a row: its memory is bf16-mixed's (fp32 master weights under autocast)
WhatIfPrecision = Literal["fp32", "bf16-mixed", "bf16"]


@dataclass(frozen=True)
class Setting:
    """One row: the settings that change memory, as the spec names them."""

    finetuning: str  # "full", "lora" or "qlora"
    gradient_checkpointing: bool
    optimizer: str
    precision: str = DEFAULT_PRECISION

    @property
    def label(self) -> str:
        checkpointing = "ckpt" if self.gradient_checkpointing else "no ckpt"
        return f"{self.finetuning} · {checkpointing} · {self.precision} · {self.optimizer}"

    def update(self) -> dict[str, Any]:
        lora = self.finetuning in ("lora", "qlora")
        return {"finetuning": "lora" if lora else "full",
                "quantization": "nf4" if self.finetuning == "qlora" else "none",
                "gradient_checkpointing": self.gradient_checkpointing, "optimizer": self.optimizer,
                "precision": self.precision}


FINETUNINGS: tuple[FineTuningWord, ...] = ("full", "lora", "qlora")
CHECKPOINTING = (False, True)
OPTIMIZERS: tuple[Optimizer, ...] = ("adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit")


def default_precisions(precision: str = DEFAULT_PRECISION) -> list[str]:
    """The rows' precisions when none are named: the base's, and pure bf16 beside bf16-mixed."""
    return [precision, "bf16"] if precision == "bf16-mixed" else [precision]


def settings_grid(finetunings: Sequence[str] = FINETUNINGS, checkpointing: Sequence[bool] = CHECKPOINTING,
                  optimizers: Sequence[str] = OPTIMIZERS, precisions: Sequence[str] | None = None) -> list[Setting]:
    """Every combination of the four axes: the table's rows (precisions: default_precisions() when None).

    The optimizer varies fastest: the rows that share a build (all but the optimizer) are neighbours,
    so `Builds` keeps one build for them and their optimizers learn their trials together.
    """
    unknown = [f for f in finetunings if f not in FINETUNINGS]
    if unknown:
        raise SpecError(f"finetuning must be among {', '.join(FINETUNINGS)} (got {', '.join(unknown)})")
    return [Setting(f, c, o, p) for f in finetunings for c in checkpointing
            for p in (default_precisions() if precisions is None else precisions) for o in optimizers]


@dataclass
class Cell:
    """One setting at one seq_len: what `fitprobe probe --estimate` with that spec would answer."""

    seq_len: int
    max_micro_batch: int | None = None  # None: not applicable (see `note`)
    safe_micro_batch: int | None = None
    peak_bytes: int | None = None  # peak allocated at the max micro-batch
    note: str | None = None
    # the depths of the two cuts its trials ran and extrapolated, as a probe's report names them; None: full depth
    extrapolated_from_layers: list[int] | None = None


@dataclass
class Longest:
    """The longest seq_len on the grid that fits at micro-batch 1, and the grid point above it (which does not)."""

    seq_len: int | None  # 0: not even the shortest grid point fits; None: not applicable
    next_candidate: int | None = None  # None when seq_len is the model's context
    peak_bytes: int | None = None
    trials: int = 0
    note: str | None = None


@dataclass
class Row:
    setting: Setting
    label: str
    cells: list[Cell] = field(default_factory=list)
    longest: Longest | None = None


@dataclass
class WhatIf:
    model: str
    capacity_bytes: int
    precision: str  # the base's (the request's `precision`); each row's own is its setting's
    seq_lens: list[int]
    context: int
    rows: list[Row]
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_whatif(table: WhatIf) -> str:
    """The table as text: a row per setting, per seq_len its max and safe micro-batch and the max's peak, then
    the longest."""
    head = [f"{'seq_len ' + str(s):>26}" for s in table.seq_lens]
    precisions = list(dict.fromkeys(row.setting.precision for row in table.rows)) or [table.precision]
    precision = ", ".join(f"{p} (the default precision)" if p == DEFAULT_PRECISION else p for p in precisions)
    width = max([36, *(len(row.label) + 2 for row in table.rows)])
    lines = [(f"{table.model} on {format_bytes(table.capacity_bytes)} ({ESTIMATED}), precision {precision}; "
              "each cell: max micro-batch · safe micro-batch, which leaves the headroom free (peak at the max)"),
             f"{'setting':<{width}}" + "".join(head) + f"  {'longest seq at mb 1':>20}"]
    every_cell = [cell for row in table.rows for cell in row.cells]
    # a reason not to apply is often long and shared by a whole row or column: numbered, said once below
    numbers: dict[str, int] = {}
    for note in [cell.note for cell in every_cell] + [row.longest.note if row.longest else None for row in table.rows]:
        if note:
            numbers.setdefault(note, len(numbers) + 1)
    for row in table.rows:
        cells = []
        for cell in row.cells:
            if cell.max_micro_batch is None:
                text = f"n/a [{numbers[cell.note]}]" if cell.note else "n/a"
            elif cell.max_micro_batch == 0:
                text = "does not fit"
            else:
                text = f"{cell.max_micro_batch} · safe {cell.safe_micro_batch} ({format_bytes(cell.peak_bytes)})"
            cells.append(f"{text:>26}")
        longest = row.longest
        if longest is None or longest.seq_len is None:
            last = f"n/a [{numbers[longest.note]}]" if longest is not None and longest.note else "n/a"
        else:
            last = str(longest.seq_len) if longest.seq_len else f"< {SEQ_GRID}"
        lines.append(f"{row.label:<{width}}" + "".join(cells) + f"  {last:>20}")
    cut = [cell for cell in every_cell if cell.extrapolated_from_layers]
    if cut:
        depths = " and ".join(str(d) for d in cut[0].extrapolated_from_layers or [])
        full_depth = sum(cell.max_micro_batch is not None and not cell.extrapolated_from_layers for cell in every_cell)
        lines.append(f"{len(cut)} of {len(every_cell)} cells extrapolated from cuts of {depths} layers, as a probe's "
                     f"estimate of them is" + (f"; {full_depth} ran the full depth" if full_depth else ""))
    lines.extend(f"n/a [{number}]: {note.removeprefix('not applicable: ')}" for note, number in numbers.items())
    lines.append(f"model context {table.context} tokens; longest seq searched on a {SEQ_GRID}-token grid; "
                 f"{table.wall_s:.1f}s")
    return "\n".join(lines)
