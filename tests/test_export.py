"""Exported configs, checked by the frameworks that read them.

Every expected number is hand arithmetic on the plan:
- 96 with max micro-batch 32 on 1 device: 32 × 3 × 1, even and exact.
- 64 with max micro-batch 16 on 2 devices: 32 per device = 16 × 2, so 16 × 2 × 2.
- 97 with max 32 on 1 device: 97 is prime; the plan is the only even exact split, 1 × 97.
- 65 with max 32 on 2 devices: 65 is not a multiple of 2, so uneven. Even neighbours:
  64 = 32 × 1 × 2 (-1.54%) and 66 = 11 × 3 × 2 (+1.54%): a tie, so the export goes below, to 32 × 1 × 2.
- 101 with max 32 on 3 devices: 101 is not a multiple of 3, so uneven. Even neighbours:
  99 = 11 × 3 × 3 (-1.98%) and 102 = 17 × 2 × 3 (+0.99%): the export goes above, to 17 × 2 × 3.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from unittest import mock

import pytest
import yaml

from fitprobe.probe.cli import main
from fitprobe.probe.export import FORMATS, ExportError, export_plan, render
from fitprobe.probe.plan import make_plan
from fitprobe.probe.report import PlanFacts
from fitprobe.probe.spec import ProbeSpec

EVEN_1 = (make_plan(96, 32, 1), (32, 3, 1), 96)
EVEN_2 = (make_plan(64, 16, 2), (16, 2, 2), 64)
TIE_BELOW = (make_plan(65, 32, 2), (32, 1, 2), 64)
CLOSER_ABOVE = (make_plan(101, 32, 3), (17, 2, 3), 102)
PLANS = {"even-1": EVEN_1, "even-2-devices": EVEN_2, "uneven-tie-below": TIE_BELOW, "uneven-above": CLOSER_ABOVE}
PRECISIONS = ["fp32", "bf16-mixed", "fp16-mixed", "bf16"]


def export(plan: PlanFacts, settings: dict, fmt: str, **provenance) -> dict:
    """The settings a test names, as `fitprobe plan --format` passes them: a ProbeSpec, its row length known only
    when given."""
    return export_plan(plan, ProbeSpec(**settings), fmt, seq_len_known="seq_len" in settings, **provenance)


def micro_and_accumulation(fmt: str, config: dict) -> tuple[int, int]:
    """Where each framework keeps the two numbers; read the way its users read them."""
    return {
        "hf": lambda c: (c["per_device_train_batch_size"], c["gradient_accumulation_steps"]),
        "trl": lambda c: (c["per_device_train_batch_size"], c["gradient_accumulation_steps"]),
        "accelerate": lambda c: (c["dataloader"]["batch_size"], c["accelerator"]["gradient_accumulation_steps"]),
        "deepspeed": lambda c: (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]),
        "lightning": lambda c: (c["data"]["batch_size"], c["trainer"]["accumulate_grad_batches"]),
        "axolotl": lambda c: (c["micro_batch_size"], c["gradient_accumulation_steps"]),
        "torchtune": lambda c: (c["batch_size"], c["gradient_accumulation_steps"]),
    }[fmt](config)


def test_the_plans_under_test_are_what_the_hand_arithmetic_says():
    for plan, (micro, steps, devices), _ in (EVEN_1, EVEN_2):
        split = plan.split
        assert (split.micro_batch, split.accumulation_steps, split.num_devices) == (micro, steps, devices)
        assert plan.split.even
    prime = make_plan(97, 32).facts().as_json()
    assert (prime["micro_batch"], prime["accumulation_steps"], prime["last_micro_batch"]) == (1, 97, None)
    assert make_plan(65, 32, 2).facts().as_json()["last_micro_batch"] is not None
    assert make_plan(101, 32, 3).facts().as_json()["last_micro_batch"] is not None


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_hf_training_arguments_accept_the_fields_and_multiply_to_the_effective_batch(name, precision, tmp_path):
    from transformers import TrainingArguments

    plan, (micro, steps, devices), effective = PLANS[name]
    exported = export(plan.facts(), {"precision": precision, "gradient_checkpointing": True}, "hf")
    config = exported["config"]
    # use_cpu: bf16 on a CPU-only machine raises without it; the config itself is unpacked unchanged
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers 5 warns on gradient_checkpointing: the export avoids it
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **config)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (micro, steps)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * devices == effective
    assert (args.bf16, args.fp16) == (precision == "bf16-mixed", precision == "fp16-mixed")
    assert args.activation_checkpointing
    if precision == "bf16":
        assert any("load the weights in bf16" in note for note in exported["provenance"]["notes"])


def test_hf_yaml_loads_with_hf_argument_parser_unchanged(tmp_path):
    from transformers import HfArgumentParser, TrainingArguments

    config = export(make_plan(97, 32).facts(), {"precision": "fp16-mixed"}, "hf")
    path = tmp_path / "args.yaml"
    path.write_text(render(config, as_yaml=True))
    (args,) = HfArgumentParser(TrainingArguments).parse_yaml_file(str(path), allow_extra_keys=False)
    # 97 is prime: the plan is the even 1 × 97, exported as is, not silently another batch
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.fp16) == (1, 97, True)
    assert args.activation_checkpointing is False
    assert "effective_batch_asked: 97" in path.read_text()  # the provenance rides along as comments


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("precision,lightning_precision",
                         [("fp32", "32-true"), ("bf16-mixed", "bf16-mixed"), ("fp16-mixed", "16-mixed"),
                          ("bf16", "bf16-true")])
def test_lightning_trainer_constructs_with_the_exported_arguments(name, precision, lightning_precision):
    import lightning

    plan, (_micro, steps, devices), effective = PLANS[name]
    config = export(plan.facts(), {"precision": precision}, "lightning")["config"]
    assert config["trainer"] == {"accumulate_grad_batches": steps, "devices": devices, "precision": lightning_precision}
    trainer = lightning.Trainer(**config["trainer"], accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    assert (trainer.accumulate_grad_batches, trainer.num_devices) == (steps, devices)
    if precision != "fp16-mixed":  # Lightning runs 16-mixed as bf16-mixed on a CPU
        assert trainer.precision == lightning_precision
    assert config["data"]["batch_size"] * trainer.accumulate_grad_batches * trainer.num_devices == effective


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("precision,mixed", [("fp32", "no"), ("bf16-mixed", "bf16"), ("fp16-mixed", "fp16"),
                                             ("bf16", "no")])
def test_accelerate_accelerator_and_config_file_take_the_export(name, precision, mixed, tmp_path):
    from accelerate import Accelerator
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.state import AcceleratorState

    plan, (_micro, steps, devices), effective = PLANS[name]
    exported = export(plan.facts(), {"precision": precision}, "accelerate")
    config = exported["config"]
    try:
        accelerator = Accelerator(**config["accelerator"], cpu=True)
        assert (accelerator.gradient_accumulation_steps, accelerator.mixed_precision) == (steps, mixed)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    path = tmp_path / "accelerate.yaml"
    path.write_text(render(exported, as_yaml=True))
    cluster = ClusterConfig.from_yaml_file(str(path))  # raises on any key accelerate does not know
    assert (cluster.num_processes, cluster.mixed_precision) == (devices, mixed)
    assert config["dataloader"]["batch_size"] * steps * cluster.num_processes == effective


class _DataParallel:
    """The `mpu` DeepSpeedConfig asks for the data-parallel world size (no process group needed)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


def _deepspeed_config(config: dict, world_size: int):
    from deepspeed.runtime import config as ds_config

    with mock.patch.object(ds_config.dist, "get_rank", return_value=0):
        return ds_config.DeepSpeedConfig(config, mpu=_DataParallel(world_size))


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_deepspeed_config_passes_deepspeeds_batch_assertion(name, precision):
    plan, (micro, steps, devices), effective = PLANS[name]
    config = export(plan.facts(), {"precision": precision}, "deepspeed")["config"]
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (micro, steps, effective)
    pytest.importorskip("deepspeed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = _deepspeed_config(config, devices)
        assert parsed.train_batch_size == effective and parsed.world_size == devices
        assert parsed.bfloat16_config.enabled == (precision in ("bf16-mixed", "bf16"))
        assert parsed.float16_config.enabled == (precision == "fp16-mixed")
        # the check is real: one example off and DeepSpeed refuses the config
        with pytest.raises(AssertionError, match="train_batch_size is not equal"):
            _deepspeed_config({**config, "train_batch_size": effective + 1}, devices)


@pytest.mark.parametrize("name", PLANS)
def test_axolotl_and_torchtune_yaml_carry_the_split_and_settings(name):
    plan, (micro, steps, devices), effective = PLANS[name]
    spec = {"precision": "bf16-mixed", "gradient_checkpointing": True, "finetuning": "lora",
            "lora": {"rank": 16, "alpha": 32, "targets": ["q_proj", "v_proj"]}, "optimizer": "paged_adamw_8bit"}
    axolotl = yaml.safe_load(render(export(plan.facts(), spec, "axolotl"), as_yaml=True))
    assert axolotl == {"micro_batch_size": micro, "gradient_accumulation_steps": steps, "bf16": True, "fp16": False,
                       "gradient_checkpointing": True, "adapter": "lora", "lora_r": 16, "lora_alpha": 32,
                       "lora_target_modules": ["q_proj", "v_proj"], "optimizer": "paged_adamw_8bit"}
    torchtune = yaml.safe_load(render(export(plan.facts(), spec, "torchtune"), as_yaml=True))
    assert torchtune == {"batch_size": micro, "gradient_accumulation_steps": steps,
                         "enable_activation_checkpointing": True, "dtype": "bf16",
                         "optimizer": {"_component_": "bitsandbytes.optim.PagedAdamW8bit"}}
    assert micro * steps * devices == effective


def test_pure_bf16_is_axolotls_no_amp_mode_and_torchtune_refuses_fp16():
    plan = make_plan(96, 32).facts()
    assert export(plan, {"precision": "bf16"}, "axolotl")["config"]["bfloat16"] is True
    assert export(plan, {"precision": "fp32"}, "torchtune")["config"]["dtype"] == "fp32"
    with pytest.raises(ExportError, match="torchtune trains in fp32 or bf16 only"):
        export(plan, {"precision": "fp16-mixed"}, "torchtune")
    with pytest.raises(ExportError, match="format must be one of hf, trl, accelerate"):
        export(plan, {}, "keras")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name,asked,given,deviation,side",
                         [("uneven-tie-below", 65, 64, -1.54, "below"), ("uneven-above", 101, 102, 0.99, "above")])
def test_an_uneven_plan_exports_its_nearest_even_plan_and_says_so(fmt, name, asked, given, deviation, side):
    plan, (micro, steps, _devices), _ = PLANS[name]
    assert plan.facts().as_json()["last_micro_batch"] is not None  # the recommendation itself is uneven
    exported = export(plan.facts(), {"precision": "bf16-mixed"}, fmt, max_micro_batch=34, safe_micro_batch=32)
    assert micro_and_accumulation(fmt, exported["config"]) == (micro, steps)
    provenance = exported["provenance"]
    assert (provenance["effective_batch_asked"], provenance["effective_batch"]) == (asked, given)
    assert provenance["deviation_percent"] == deviation
    assert f"nearest even plan ({side}" in provenance["why_not_the_plan"]
    assert (provenance["max_micro_batch"], provenance["safe_micro_batch"]) == (34, 32)
    text = render(exported, as_yaml=True)
    assert f"effective_batch_asked: {asked}" in text and f"deviation_percent: {deviation}" in text


def test_an_even_plan_is_exported_as_is_with_its_provenance():
    exported = export(make_plan(96, 32).facts(), {}, "hf")
    provenance = exported["provenance"]
    assert provenance["effective_batch"] == provenance["effective_batch_asked"] == 96
    assert provenance["deviation_percent"] == 0 and "why_not_the_plan" not in provenance
    assert provenance["split"] == "micro_batch 32 × accumulation_steps 3 × devices 1"
    assert json.loads(render(exported)) == exported["config"], "the JSON text is the config alone"


def test_fitprobe_plan_format_prints_the_config(capsys):
    assert main(["plan", "--effective-batch", "97", "--max-micro-batch", "32", "--format", "deepspeed",
                 "--precision", "bf16-mixed"]) == 0
    printed = capsys.readouterr()
    config = json.loads(printed.out)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (97, 1)  # 97 is prime
    assert config["bf16"]["enabled"] and "fitprobe" not in json.dumps(config)
    assert "#   max_micro_batch: 32" in printed.err and "#   effective_batch_asked: 97" in printed.err
    assert main(["plan", "--effective-batch", "64", "--max-micro-batch", "16", "--devices", "2",
                 "--format", "lightning", "--yaml", "--precision", "fp32"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {
        "trainer": {"accumulate_grad_batches": 2, "devices": 2, "precision": "32-true"}, "data": {"batch_size": 16}}


def test_fitprobe_probe_format_needs_an_effective_batch(capsys):
    assert main(["probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32", "--device", "cpu",
                 "--format", "hf"]) == 2
    assert "--effective-batch" in capsys.readouterr().err


def test_fitprobe_probe_format_exports_the_probed_plan(capsys):
    code = main(["probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32", "--device", "cpu",
                 "--capacity", "16MiB",
                 "--effective-batch", "24", "--no-verify", "--format", "hf"])
    assert code == 0
    config = json.loads(capsys.readouterr().out)
    assert main(["probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32", "--device", "cpu",
                 "--capacity", "16MiB",
                 "--effective-batch", "24", "--no-verify", "--format", "hf", "--json", "--quiet"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["config"] == config and exported["format"] == "hf"
    provenance = exported["provenance"]
    assert config["per_device_train_batch_size"] * config["gradient_accumulation_steps"] == 24
    assert config["per_device_train_batch_size"] <= provenance["safe_micro_batch"] <= provenance["max_micro_batch"]
    assert "verified" not in provenance  # --no-verify: no verdict to claim


def test_the_saved_hf_json_unpacks_into_training_arguments_without_a_warning(tmp_path):
    from transformers import TrainingArguments

    run = subprocess.run([sys.executable, "-m", "fitprobe.probe.cli", "plan", "--effective-batch", "96", "--max-micro-batch",
                          "32", "--format", "hf", "--grad-checkpointing", "--lora", "--precision", "fp32"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    saved = tmp_path / "args.json"
    saved.write_text(run.stdout)  # what `fitprobe plan ... --format hf > args.json` saves
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = TrainingArguments(**json.loads(saved.read_text()))
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (32, 3)
    assert args.activation_checkpointing
    assert run.stderr.startswith("# fitprobe:") and "#   effective_batch_asked: 96" in run.stderr
    assert "target_modules=..." in run.stderr and '["q_proj", "k_proj", "v_proj", "o_proj"]' in run.stderr


def test_a_lora_probes_export_names_the_modules_it_adapted(capsys):
    assert main(["probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32", "--capacity", "16MiB",
                 "--estimate",
                 "--lora", "--effective-batch", "8", "--format", "hf", "--json", "--quiet"]) == 0
    notes = json.loads(capsys.readouterr().out)["provenance"]["notes"]
    lora = next(note for note in notes if note.startswith("LoRA:"))
    assert 'target_modules=["c_attn"])' in lora, lora


def test_a_qlora_export_gives_the_quantization_config_as_an_object_bitsandbytesconfig_takes(capsys):
    import torch
    from transformers import BitsAndBytesConfig

    assert main(["plan", "--effective-batch", "64", "--max-micro-batch", "8", "--format", "hf", "--lora",
                 "--quantization", "nf4", "--json"]) == 0
    provenance = json.loads(capsys.readouterr().out)["provenance"]
    loaded = BitsAndBytesConfig(**provenance["quantization_config"])
    # what fitprobe loads (probe/models/quantization.py), as bitsandbytes' own object holds it
    assert (loaded.load_in_4bit, loaded.bnb_4bit_quant_type, loaded.bnb_4bit_use_double_quant,
            loaded.bnb_4bit_compute_dtype) == (True, "nf4", True, torch.bfloat16)
    assert any("BitsAndBytesConfig(**quantization_config)" in note for note in provenance["notes"])


def test_axolotl_lora_names_its_target_modules_or_says_how_to_give_them(capsys):
    base = ["plan", "--effective-batch", "64", "--max-micro-batch", "8", "--format", "axolotl", "--lora"]
    assert main([*base, "--lora-targets", "q_proj,v_proj"]) == 0
    assert json.loads(capsys.readouterr().out)["lora_target_modules"] == ["q_proj", "v_proj"]
    assert main(base) == 2
    assert "--lora-targets" in capsys.readouterr().err


def test_a_padded_plan_says_where_rows_are_cut_in_each_frameworks_words(capsys):
    base = ["plan", "--effective-batch", "64", "--max-micro-batch", "8", "--seq-len", "1024", "--json"]
    assert main([*base, "--format", "axolotl"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["sequence_len"] == 1024
    assert main([*base, "--format", "torchtune"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["tokenizer"] == {"max_seq_len": 1024}
    assert main([*base, "--format", "hf"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert "max_length" not in exported["config"]  # TrainingArguments(**config) has no such field
    assert any("max_length=1024" in note for note in exported["provenance"]["notes"])


@pytest.mark.parametrize("checkpointing", [True, False])
def test_hf_export_always_says_whether_to_checkpoint_so_trls_default_cannot_turn_it_on(checkpointing, tmp_path):
    """SFTConfig defaults gradient checkpointing to True: a config that left it out trained another step."""
    from trl import SFTConfig

    config = export(make_plan(96, 32).facts(), {"gradient_checkpointing": checkpointing}, "hf")["config"]
    assert config["gradient_checkpointing"] is checkpointing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers 5 warns on gradient_checkpointing alone
        args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, **config)
    assert (args.gradient_checkpointing, args.activation_checkpointing) == (checkpointing, checkpointing)


def test_all_linear_lora_exports_peft_and_axolotl_spellings():
    spec = {"finetuning": "lora", "lora": {"rank": 8, "alpha": 16, "targets": ["all-linear"]}}
    notes = export(make_plan(96, 32).facts(), spec, "hf")["provenance"]["notes"]
    assert any('target_modules="all-linear")' in note for note in notes), notes
    axolotl = export(make_plan(96, 32).facts(), spec, "axolotl")["config"]
    assert axolotl["lora_target_linear"] is True and "lora_target_modules" not in axolotl
