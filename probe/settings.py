"""The operator's settings the command line and the service share, read once from `FITPROBE_*` variables.

An operator sets these for every run on a machine, whichever door a request comes through: which model
factories may be imported, how large a model a request may name, the virtual capacity of the CPU device.
`fitprobe probe` and `fitprobe serve` must read them alike (a model the service refuses is refused on the
command line with the same words), so both read this one class: app/config.py `Settings` extends it with
what only a service has (ports, tokens, queues). Pydantic-settings parses and bounds each variable, and a
bad value names the variable.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fitprobe.probe.models.bounds import ModelLimits
from fitprobe.probe.spec import SpecError

DEFAULT_CPU_CAPACITY_BYTES = 1 << 30  # the CPU device's virtual capacity when nobody names one
_LIMITS = ModelLimits()


def comma_separated(value: object) -> object:
    """`a, b,c` → ["a", "b", "c"]: how a list setting is written in one environment variable."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FITPROBE_")

    allowed_factories: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated pkg.module:function model factories requests may name"
    )
    cpu_capacity_bytes: int = Field(DEFAULT_CPU_CAPACITY_BYTES, description="virtual capacity of the CPU device "
                                    "(bytes)")
    max_model_params: int = Field(
        _LIMITS.max_params, ge=1, description="largest parameter count a model's config may add up to (counted "
        "from the config at submit, nothing is built)")
    max_model_layers: int = Field(_LIMITS.max_layers, ge=1, description="largest layer count a model's config "
                                  "may name")
    max_param_tokens: int = Field(
        _LIMITS.max_param_tokens, ge=1, description="largest parameters × tokens of one micro-batch (seq_len × the "
        "largest micro-batch the search may try)")

    @field_validator("allowed_factories", mode="before")
    @classmethod
    def _factories_comma_separated(cls, value: object) -> object:
        return comma_separated(value)

    @property
    def model_limits(self) -> ModelLimits:
        return ModelLimits(max_params=self.max_model_params, max_layers=self.max_model_layers,
                           max_param_tokens=self.max_param_tokens)


def operator_settings() -> OperatorSettings:
    """The settings from the environment; a bad value is a SpecError naming the variable and what it must be."""
    try:
        return OperatorSettings()
    except ValidationError as exc:
        problems = "; ".join(f"FITPROBE_{'_'.join(map(str, error['loc'])).upper()}: {error['msg']}"
                             for error in exc.errors())
        raise SpecError(f"an operator setting is not usable ({problems}): fix or unset it") from None
