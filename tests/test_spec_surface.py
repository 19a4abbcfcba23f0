"""One spec, one surface: every ProbeSpec field reaches the command line and the form, saying what the field says.

The expected values come from pydantic's JSON schema of ProbeSpec (the schema the HTTP API publishes),
not from probe/spec_options.py, which builds the options from the fields themselves.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from fitprobe_client.preflight import add_options as add_preflight_options
from fitprobe.probe.cli import build_parser
from fitprobe.probe.spec import LoraSpec, ProbeSpec
from fitprobe.probe.spec_options import LORA_OPTIONS, NOT_ON_THE_COMMAND_LINE, OPTIONS

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ProbeSpec.model_json_schema()
PROPERTIES = SCHEMA["properties"]
# the form leaves these to the service or the command line, for the reason given
NOT_IN_THE_FORM = {
    "device": "the service runs a job on the device its worker owns",
    "data": "a dataset file is read on the user's machine (the command line); the API takes its row lengths",
}


def _command(name: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def _enum(prop: dict) -> list | None:
    return prop.get("enum") or next((p["enum"] for p in prop.get("anyOf", []) if "enum" in p), None)


def test_every_field_has_an_option_or_a_reason():
    for name in ProbeSpec.model_fields:
        assert (name in OPTIONS) != (name in NOT_ON_THE_COMMAND_LINE), name
    assert set(LORA_OPTIONS) == set(LoraSpec.model_fields)


@pytest.mark.parametrize("command", ["probe", "trial"])
def test_each_option_says_what_its_field_says(command):
    actions = _actions(_command(command))
    for name, option in OPTIONS.items():
        if option.search and command == "trial":
            assert option.flag not in actions  # a trial runs one micro-batch and plans nothing
            continue
        action, prop = actions[option.flag], PROPERTIES[name]
        assert prop["description"].replace("%", "%%") in action.help, name
        if option.switch is not None:
            assert action.const == option.switch and action.default == prop.get("default"), name
            continue
        if _enum(prop) is not None:
            assert action.choices == _enum(prop), name
        if "default" in prop and prop["default"] is not None and not option.required:
            assert action.default == prop["default"], name
    lora = SCHEMA["$defs"]["LoraSpec"]["properties"]
    assert actions["--lora-rank"].default == lora["rank"]["default"] and actions["--lora-alpha"].default == 16


def test_an_option_refuses_what_its_field_refuses(capsys):
    parser = build_parser()
    high = PROPERTIES["micro_steps_per_trial"]["maximum"]
    with pytest.raises(SystemExit):
        parser.parse_args(["probe", "--model", "builtin:gpt-nano", "--seq-len", "8",
                           "--micro-steps-per-trial", str(high + 1)])
    assert f"must be between 2 and {high}" in capsys.readouterr().err


def test_the_preflight_gate_takes_the_specs_values():
    """The torch-free client cannot import the spec: its options are held to the spec's values here."""
    preflight = argparse.ArgumentParser()
    add_preflight_options(preflight)
    compared = set()
    for flag, action in _actions(preflight).items():
        name = next((n for n, o in OPTIONS.items() if o.flag == flag), None)
        if name is None or OPTIONS[name].switch is not None:
            continue
        prop = PROPERTIES[name]
        if _enum(prop) is not None and action.choices is not None:
            assert list(action.choices) == _enum(prop), flag
            compared.add(flag)
        if prop.get("default") is not None and action.default is not None:
            assert action.default == prop["default"], flag
            compared.add(flag)
    assert {"--precision", "--quantization", "--devices"} <= compared


def test_every_field_is_in_the_form_or_left_out_with_a_reason():
    page = (ROOT / "app" / "static" / "index.html").read_text()
    ids = set(re.findall(r'id="f-([a-z_]+)', page))
    for name in ProbeSpec.model_fields:
        assert (name in ids) != (name in NOT_IN_THE_FORM), name
