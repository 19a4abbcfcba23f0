"""One spec, one surface: every ProbeSpec field reaches the command line and the form, saying what the field says.

The expected values come from pydantic's JSON schema of ProbeSpec (the schema the HTTP API publishes),
not from probe/spec_options.py, which builds the options from the fields themselves.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from fitprobe_client.preflight import add_options as add_preflight_options
from fitprobe_client.preflight import main as preflight_main
from fitprobe.probe.cli import build_parser
from fitprobe.probe.spec import LoraSpec, ProbeSpec
from fitprobe.probe.spec_options import LORA_OPTIONS, NOT_ON_THE_COMMAND_LINE, OPTIONS, preflight_table

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TABLE = ROOT / "client" / "fitprobe_client" / "spec_options.json"
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


def _bound(prop: dict, key: str) -> float:
    """`minimum` or `maximum`, also of an optional field (whose schema is anyOf [bounded, null])."""
    return prop[key] if key in prop else next(p[key] for p in prop["anyOf"] if key in p)


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


def _preflight_actions() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser()
    add_preflight_options(parser)
    return _actions(parser)


def test_the_shipped_preflight_table_is_the_one_the_spec_writes():
    shipped = json.loads(SHIPPED_TABLE.read_text(encoding="utf-8"))
    assert shipped == json.loads(json.dumps(preflight_table())), (
        "client/fitprobe_client/spec_options.json is stale: a ProbeSpec field or its option changed. Regenerate it "
        "with `PYTHONPATH=. python -m fitprobe.probe.spec_options > client/fitprobe_client/spec_options.json`")


def test_every_field_reaches_preflight_or_is_left_out_with_a_reason():
    table = json.loads(SHIPPED_TABLE.read_text(encoding="utf-8"))
    reached = {row["field"] for row in table["options"] if row["parent"] is None}
    for name in PROPERTIES:
        assert (name in reached) != (name in table["left_out"]), name
        assert name not in table["left_out"] or len(table["left_out"][name]) > 20, f"{name}: say why"
    # the service never opens a path, picks the device itself, and takes LoRA's settings one by one
    assert set(table["left_out"]) == {"data", "device", "lora"}
    lora = {row["field"] for row in table["options"] if row["parent"] == "lora"}
    assert lora == set(SCHEMA["$defs"]["LoraSpec"]["properties"])
    actions = _preflight_actions()
    for flag in ("--sharding", "--collation", "--lora-rank", "--lora-alpha", "--lora-targets", "--estimate",
                 "--gpu", "--headroom", "--effective-batch-tokens", "--seed", "--max-micro-batch"):
        assert flag in actions, flag


def test_preflight_options_say_what_the_probe_command_says():
    """Same choices, defaults, switches and help as `fitprobe probe`, whose options come from the fields."""
    probe, preflight = _actions(_command("probe")), _preflight_actions()
    spec_flags = {option.flag for option in [*OPTIONS.values(), *LORA_OPTIONS.values()]}
    shared = spec_flags & set(preflight)
    assert shared == spec_flags - {"--data", "--device"}
    for flag in shared:
        ours, theirs = preflight[flag], probe[flag]
        assert (ours.dest, ours.choices, ours.const) == (theirs.dest, theirs.choices, theirs.const), flag
        assert ours.default == theirs.default or (theirs.required and ours.default is None), flag
        assert theirs.help.removesuffix("%%") in ours.help or flag == "--model", flag
    assert preflight["--sharding"].choices == _enum(PROPERTIES["sharding"]) == ["none", "fsdp"]
    assert preflight["--collation"].default == "padded" and preflight["--lora-rank"].default == 8


@pytest.mark.parametrize("flag, name", [("--headroom", "headroom"), ("--micro-steps-per-trial", "micro_steps_per_trial"),
                                        ("--devices", "num_devices"), ("--effective-batch-tokens", "effective_batch_tokens")])
def test_a_preflight_option_refuses_what_its_field_refuses_naming_the_bound(flag, name, capsys):
    low, high, parser = _bound(PROPERTIES[name], "minimum"), _bound(PROPERTIES[name], "maximum"), argparse.ArgumentParser()
    add_preflight_options(parser)
    base = ["--server", "localhost:1", "--model", "builtin:gpt-nano", "--seq-len", "8"]
    assert getattr(parser.parse_args([*base, flag, str(high)]), name) == high
    with pytest.raises(SystemExit) as refused:
        parser.parse_args([*base, flag, str(high + 1)])
    assert refused.value.code == 2
    assert f"{name} must be between {low} and {high} (got {high + 1})" in capsys.readouterr().err


def test_preflight_help_names_the_spec_options(capsys):
    with pytest.raises(SystemExit) as shown:
        preflight_main(["--help"])
    out = capsys.readouterr().out
    assert shown.value.code == 0
    for words in ("--sharding {none,fsdp}", "--collation {padded,packed,flattened}", "--lora-rank", "--lora-targets",
                  "--effective-batch-tokens", "--server", "--require-exact"):
        assert words in out, words


def test_every_field_is_in_the_form_or_left_out_with_a_reason():
    page = (ROOT / "app" / "static" / "index.html").read_text()
    ids = set(re.findall(r'id="f-([a-z_]+)', page))
    for name in ProbeSpec.model_fields:
        assert (name in ids) != (name in NOT_IN_THE_FORM), name
