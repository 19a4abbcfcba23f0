"""The command line's options for ProbeSpec's fields, made from the fields: help, default, choices, bounds.

ProbeSpec is the one place a training setting is described. The `probe` and `trial` commands take
each field through the option named for it in OPTIONS; what the option says (its help is the field's
description, its choices the field's Literal values, its default the field's, its integer bounds the
field's) is read from the field here, so a description changed in probe/spec.py changes `--help`
too. A field without an option is in NOT_ON_THE_COMMAND_LINE with the reason;
tests/test_spec_surface.py holds every field to one of the two, and the service's form and the
pre-flight command to the same values.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from annotated_types import Ge, Le
from pydantic.fields import FieldInfo

from fitprobe.probe.gpus import GPU_TOTAL_MIB
from fitprobe.probe.spec import LoraSpec, ProbeSpec


@dataclass(frozen=True)
class Option:
    """How one field is spelled on the command line.

    `switch`: a flag without a value that sets the field to this value (e.g. --lora sets finetuning to
    "lora"); `search`: only `probe` has it (a trial runs one micro-batch and plans nothing).
    """

    flag: str
    switch: Any = None
    required: bool = False
    search: bool = False
    metavar: str | None = None
    text: bool = False  # handed to ProbeSpec as written, which parses it (a capacity with units)


OPTIONS: dict[str, Option] = {
    "model": Option("--model", required=True),
    "seq_len": Option("--seq-len", required=True),
    "precision": Option("--precision"),
    "optimizer": Option("--optimizer", metavar="OPTIM"),
    "finetuning": Option("--lora", switch="lora"),
    "quantization": Option("--quantization"),
    "gradient_checkpointing": Option("--grad-checkpointing", switch=True),
    "collation": Option("--collation"),
    "trainer": Option("--trainer"),
    "liger": Option("--liger", switch=True),
    "mode": Option("--estimate", switch="estimate"),
    "extrapolate": Option("--no-extrapolate", switch=False),
    "device": Option("--device"),
    "capacity_bytes": Option("--capacity", metavar="BYTES", text=True),
    "gpu": Option("--gpu", metavar="CARD"),
    "num_devices": Option("--devices"),
    "sharding": Option("--sharding"),
    "micro_steps_per_trial": Option("--micro-steps-per-trial"),
    "optimizer_steps_per_trial": Option("--optimizer-steps-per-trial"),
    "seed": Option("--seed"),
    "data": Option("--data", metavar="PATH"),
    "headroom": Option("--headroom", search=True),
    "estimate_first": Option("--estimate-first", switch=True, search=True),
    "max_micro_batch": Option("--max-micro-batch", search=True),
    "effective_batch": Option("--effective-batch", search=True),
    "effective_batch_tokens": Option("--effective-batch-tokens", search=True),
    "eval": Option("--eval", switch=True, search=True),
    "eval_alone": Option("--eval-alone", switch=True, search=True),
    "eval_compute_metrics": Option("--eval-compute-metrics", switch=True, search=True),
    "eval_rows": Option("--eval-rows", search=True),
    "eval_batch_size": Option("--eval-batch-size", search=True),
    "generate": Option("--generate", switch=True, search=True),
    "generate_alone": Option("--generate-alone", switch=True, search=True),
    "generate_batch_size": Option("--generate-batch-size", search=True),
    "max_new_tokens": Option("--max-new-tokens", search=True),
    "cache_implementation": Option("--cache-implementation", search=True),
}
LORA_OPTIONS: dict[str, Option] = {
    "rank": Option("--lora-rank"), "alpha": Option("--lora-alpha"), "targets": Option("--lora-targets"),
}
# every ProbeSpec field has an option above or a line here
NOT_ON_THE_COMMAND_LINE: dict[str, str] = {
    "lora": "spelled as its own fields: --lora-rank, --lora-alpha, --lora-targets",
}
# what the command line adds to a field's own description
CLI_NOTES: dict[str, str] = {
    "capacity_bytes": "; with units, e.g. 600MiB or 40GiB",
    "data": " (command line: a .jsonl or .parquet file with input_ids, a datasets save_to_disk folder, or a "
            ".txt/.lengths file of one length per line, read streaming here)",
    "device": " (default: cuda:0 when CUDA is available, else cpu)",
    "targets": " (comma-separated)",
}
# what pre-flight (the torch-free client's `fitprobe preflight`) leaves out of its request, and why;
# every other field with an option reaches it, through the table in client/fitprobe_client/spec_options.json
NOT_IN_PREFLIGHT: dict[str, str] = {
    "data": "the service never opens a path a request names; `fitprobe probe --data PATH` reads a dataset on "
            "your machine and sends its row lengths",
    "device": "the service runs the job on the device a free worker owns (POST /v1/probes refuses one it lacks)",
    **NOT_ON_THE_COMMAND_LINE,
}
PREFLIGHT_NOTES: dict[str, str] = {**CLI_NOTES, "model": "; required: pre-flight never picks a model. "
                                   "An hf: path (a config.json or its directory) is read here and sent inline"}
# pre-flight verifies the plan for a target per optimizer step: one of these, in examples or in tokens
PREFLIGHT_TARGET = ["effective_batch", "effective_batch_tokens"]
REGENERATE = "python -m fitprobe.probe.spec_options > client/fitprobe_client/spec_options.json"


def _bounds(info: FieldInfo) -> tuple[int | float | None, int | float | None]:
    low = next((m.ge for m in info.metadata if isinstance(m, Ge)), None)
    high = next((m.le for m in info.metadata if isinstance(m, Le)), None)
    return low, high  # type: ignore[return-value]  # annotated_types types them as SupportsGe/SupportsLe


def _number(kind: type, flag: str, low: Any, high: Any):
    """argparse type: a number within the field's bounds, refused with the bound in the message."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {'whole ' if kind is int else ''}number (got {text!r})") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be between {low} and {high} (got {value})" if high is not None
                                             else f"must be at least {low} (got {value})")
        return value
    parse.__name__ = flag
    return parse


def _literal(annotation: Any) -> tuple[Any, ...] | None:
    """The values of a Literal field (also inside `X | None`), else None."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    for arg in get_args(annotation):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return None


def _listed(annotation: Any) -> bool:
    """Whether the field holds a list (also inside `X | None`): written comma-separated on the command line."""
    return any(get_origin(a) is list for a in (annotation, *get_args(annotation)))


def _numeric(annotation: Any) -> type | None:
    kinds = {annotation, *get_args(annotation)}
    return int if int in kinds else float if float in kinds else None


def field_row(name: str, info: FieldInfo, option: Option, choices: list[str] | None = None,
              parent: str | None = None, notes: dict[str, str] = CLI_NOTES) -> dict[str, Any]:
    """What one field's option says, as plain data: the one reading of the field that both the library's
    commands (through add_field_option) and the torch-free client (through spec_options.json) build from.

    `kind` is how the value is read (int, float or str; null for a switch, which takes none); a whole
    number without bounds counts something, so its minimum is 1 (ProbeSpec checks the upper end).
    """
    field = name.removeprefix(f"{parent}_") if parent else name
    help_text = (info.description or "") + notes.get(name, "")
    switch = option.switch is not None
    values = None if switch else choices or _literal(info.annotation)
    number = None if switch or option.text or values is not None else _numeric(info.annotation)
    low, high = _bounds(info) if number is not None else (None, None)
    if number is int and low is None and high is None:
        low = 1
    if switch:
        help_text = f"sets {name} to {str(option.switch).lower()}: {help_text}"
    elif values is not None and option.metavar:  # the choices hide behind the metavar in the usage line
        help_text += "; one of " + ", ".join(map(str, values))
    default = None if option.required or info.is_required() else info.default
    return {"flag": option.flag, "dest": name, "field": field, "parent": parent, "help": help_text,
            "kind": None if switch else number.__name__ if number is not None else "str",
            "choices": list(values) if values is not None else None, "default": default,
            "minimum": low, "maximum": high, "switch": option.switch, "required": option.required,
            "metavar": None if switch else option.metavar, "separator": "," if _listed(info.annotation) else None}


def add_field_option(parser: argparse.ArgumentParser, name: str, info: FieldInfo, option: Option,
                     choices: list[str] | None = None, parent: str | None = None) -> None:
    """The option for one field: its help, default, choices and bounds read from the field."""
    row = field_row(name, info, option, choices, parent)
    kwargs: dict[str, Any] = {"dest": name, "help": row["help"].replace("%", "%%")}  # argparse formats help
    if row["switch"] is not None:
        kwargs.update(action="store_const", const=row["switch"], default=row["default"])
    else:
        kwargs["metavar"] = row["metavar"]
        if row["choices"] is not None:
            kwargs["choices"] = row["choices"]
        elif row["kind"] in ("int", "float"):
            kwargs["type"] = _number(int if row["kind"] == "int" else float, option.flag,
                                     row["minimum"], row["maximum"])
        if row["required"]:
            kwargs["required"] = True
        elif row["default"] is not None:
            kwargs["default"] = row["default"]
    parser.add_argument(option.flag, **kwargs)


def add_spec_options(parser: argparse.ArgumentParser, search: bool, gpu_choices: list[str]) -> None:
    """Every ProbeSpec field's option (`search`: with the ones only a probe has)."""
    for name, info in ProbeSpec.model_fields.items():
        option = OPTIONS.get(name)
        if option is None or (option.search and not search):
            continue
        add_field_option(parser, name, info, option, gpu_choices if name == "gpu" else None)
    for name, info in LoraSpec.model_fields.items():
        add_field_option(parser, f"lora_{name}", info, LORA_OPTIONS[name], parent="lora")


def preflight_table() -> dict[str, Any]:
    """The pre-flight command's spec options as plain JSON data, for the client that cannot import pydantic.

    Shipped as client/fitprobe_client/spec_options.json (regenerated by REGENERATE, and held equal to
    this by tests/test_spec_surface.py), so a new ProbeSpec field reaches `fitprobe-preflight` too.
    """
    options = [field_row(name, info, OPTIONS[name], sorted(GPU_TOTAL_MIB) if name == "gpu" else None,
                         notes=PREFLIGHT_NOTES)
               for name, info in ProbeSpec.model_fields.items() if name not in NOT_IN_PREFLIGHT]
    options += [field_row(f"lora_{name}", info, LORA_OPTIONS[name], parent="lora", notes=PREFLIGHT_NOTES)
                for name, info in LoraSpec.model_fields.items()]
    return {"regenerate": REGENERATE, "options": options, "one_of_required": PREFLIGHT_TARGET,
            "left_out": NOT_IN_PREFLIGHT}


def spec_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ProbeSpec fields the options gave (those this command has), LoRA's gathered into `lora`."""
    fields = {name: getattr(args, name) for name in OPTIONS if hasattr(args, name)}
    lora = {name: getattr(args, f"lora_{name}") for name in LORA_OPTIONS}
    if isinstance(lora["targets"], str):
        lora["targets"] = [t.strip() for t in lora["targets"].split(",") if t.strip()]
    fields["lora"] = {name: value for name, value in lora.items() if value is not None}
    return {name: value for name, value in fields.items() if value is not None}


if __name__ == "__main__":
    print(json.dumps(preflight_table(), indent=1, ensure_ascii=False))
