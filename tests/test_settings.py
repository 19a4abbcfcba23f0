"""The operator's `FITPROBE_*` settings read one way: the command line refuses what the service refuses."""

from __future__ import annotations

import pytest

from fitprobe.app.config import Settings
from fitprobe.probe import cli


def test_the_cli_and_the_service_read_the_same_factories_limits_and_cpu_capacity(monkeypatch):
    monkeypatch.setenv("FITPROBE_ALLOWED_FACTORIES", " pkg.mod:make , other.mod:build,")
    monkeypatch.setenv("FITPROBE_MAX_MODEL_PARAMS", "1000")
    service = Settings()
    assert cli.allowed_factories() == frozenset(service.allowed_factories) == {"pkg.mod:make", "other.mod:build"}
    assert cli.model_limits() == service.model_limits and service.model_limits.max_params == 1000
    monkeypatch.delenv("FITPROBE_MAX_MODEL_PARAMS")
    assert Settings().cpu_capacity_bytes == 1024 * 1024 * 1024  # 1 GiB unless the operator sets one


def test_a_model_past_the_operators_limit_is_refused_on_the_command_line_naming_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("FITPROBE_MAX_MODEL_PARAMS", "1000")
    code = cli.main(["probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--estimate", "--gpu", "h100-80gb"])
    assert code == 2 and "FITPROBE_MAX_MODEL_PARAMS" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["many", "0"])
def test_a_bad_operator_setting_exits_2_naming_the_variable(monkeypatch, capsys, value):
    monkeypatch.setenv("FITPROBE_MAX_MODEL_LAYERS", value)
    code = cli.main(["probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--estimate", "--gpu", "h100-80gb"])
    assert code == 2 and "FITPROBE_MAX_MODEL_LAYERS" in capsys.readouterr().err
