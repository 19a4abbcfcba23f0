"""Pre-flight's spec options, built from the table the library writes from ProbeSpec's fields.

This distribution cannot import the spec (pydantic and torch stay out of a CI runner), so the library
writes what each option says (its flag, help, choices, default, bounds) into spec_options.json, which
ships here: a field added to ProbeSpec reaches `fitprobe-preflight` when the table is regenerated
(`python -m fitprobe.probe.spec_options > client/fitprobe_client/spec_options.json`), and
tests/test_spec_surface.py fails until it is.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import cache
from importlib.resources import files
from typing import Any

KINDS: dict[str, type] = {"int": int, "float": float}


@cache
def table() -> dict[str, Any]:
    """The shipped table: `options` (one row per option), `one_of_required`, `left_out` (field → reason)."""
    return json.loads(files("fitprobe_client").joinpath("spec_options.json").read_text(encoding="utf-8"))


def default_of(dest: str) -> Any:
    """A spec field's default as the table (ProbeSpec) has it: what the server uses when the option is left out."""
    return next((row["default"] for row in table()["options"] if row["dest"] == dest), None)


def _number(row: dict[str, Any]) -> Callable[[str], Any]:
    """argparse type: a number within the field's bounds, refused naming the field and the bound."""
    kind, low, high, field = KINDS[row["kind"]], row["minimum"], row["maximum"], row["dest"]

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{field} must be a {'whole ' if kind is int else ''}number (got {text!r})") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{field} must be between {low} and {high} (got {value})"
                                             if high is not None else f"{field} must be at least {low} (got {value})")
        return value
    parse.__name__ = row["flag"]
    return parse


def _shown(default: Any) -> str:
    """A default as --help says it: a switch's true/false as on/off, a field left to the service as unset."""
    if isinstance(default, bool):
        return "on" if default else "off"
    return "unset" if default is None else str(default)


def add_spec_options(parser: argparse.ArgumentParser) -> None:
    """One option per row. A required one is checked by `missing`, not argparse, so that its refusal is
    the one line (and, with --json, the one object) every bad input gets."""
    targets = table()["one_of_required"]
    for row in table()["options"]:
        help_text = row["help"]
        if row["required"]:
            help_text += " (required)"
        elif row["dest"] in targets:
            others = [other["flag"] for other in table()["options"] if other["dest"] in targets and other is not row]
            help_text += f" (required, or {' or '.join(others)})"
        else:
            help_text += f" (default: {_shown(row['default'])})"
        kwargs: dict[str, Any] = {"dest": row["dest"]}
        if row["switch"] is not None:
            kwargs.update(action="store_const", const=row["switch"], default=row["default"])
        else:
            kwargs.update(metavar=row["metavar"], default=row["default"])
            if row["choices"] is not None:
                kwargs["choices"] = row["choices"]
            elif row["kind"] in KINDS:
                kwargs["type"] = _number(row)
        parser.add_argument(row["flag"], help=help_text.replace("%", "%%"), **kwargs)  # argparse formats help


def missing(args: argparse.Namespace) -> str | None:
    """What a required option or the target per optimizer step lacks, as the line that says what to add."""
    rows = {row["dest"]: row for row in table()["options"]}
    for row in rows.values():
        if row["required"] and getattr(args, row["dest"]) is None:
            return f"{row['flag']} is required: pre-flight never guesses {row['dest']}; --help says what it takes"
    target = [rows[name] for name in table()["one_of_required"]]
    if all(getattr(args, row["dest"]) is None for row in target):
        return (" or ".join(row["flag"] for row in target) + " is required: pre-flight verifies the plan for a "
                "target per optimizer step (" + " or ".join(row["dest"] for row in target) + ")")
    return None


def spec_body(args: argparse.Namespace) -> dict[str, Any]:
    """The ProbeSpec fields the options gave, LoRA's gathered into `lora`, as the request body holds them."""
    body: dict[str, Any] = {}
    for row in table()["options"]:
        value = getattr(args, row["dest"])
        if value is None:
            continue
        if row["separator"] and isinstance(value, str):
            value = [part.strip() for part in value.split(row["separator"]) if part.strip()]
        if row["parent"]:
            body.setdefault(row["parent"], {})[row["field"]] = value
        else:
            body[row["field"]] = value
    return body
