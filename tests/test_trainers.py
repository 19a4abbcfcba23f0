"""`--trainer trl` holds what TRL's SFTTrainer holds, and `--format trl` builds the SFTConfig that trains it.

The yardstick is a real `trl.SFTTrainer` run: a tiny model, padding-free batches of a pre-tokenized JSONL
written here, CPU, its whole life (model, trainer, two optimizer steps of two micro-batches) counted by
the CPU allocator's own account (torch.profiler memory events, tests/reference_loop.py). Nothing of
fitprobe's step runs in it: the SFTConfig is the one the export writes, and SFTTrainer builds its
optimizer, collator and fused LM head itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fitprobe.probe.job import run_trial
from fitprobe.probe.spec import ProbeSpec

TOLERANCE = 0.005
# Qwen3 (grouped-query attention, q/k norms) at 8k vocabulary: the head's 32768-column tile is 4x the vocabulary
FIELDS = dict(model_type="qwen3", vocab_size=8000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
              tie_word_embeddings=False)
SEQ_LEN, MICRO_BATCH, ACCUMULATION, STEPS = 64, 4, 2, 2


def write_jsonl(path: Path, rows: int, seq_len: int) -> None:
    """Pre-tokenized rows, as users hand SFTTrainer a tokenized dataset (no tokenizer runs over them)."""
    generator = torch.Generator().manual_seed(0)
    with path.open("w") as out:
        for _ in range(rows):
            ids = torch.randint(1, FIELDS["vocab_size"], (seq_len,), generator=generator).tolist()
            out.write(json.dumps({"input_ids": ids}) + "\n")


def word_level_tokenizer():
    """A tokenizer SFTTrainer accepts as processing_class; it only supplies the pad token here."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, FIELDS["vocab_size"])}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>")


def run_sft_trainer(data: Path, output_dir: Path, config: dict, use_cpu: bool = True) -> None:
    """SFTTrainer as its users run it: model from a config, the JSONL as a datasets dataset, the SFTConfig."""
    from datasets import load_dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    fields = dict(FIELDS)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields),
                                             attn_implementation="sdpa")
    args = SFTConfig(output_dir=str(output_dir), use_cpu=use_cpu, report_to=[], save_strategy="no",
                     max_steps=STEPS, **config)
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=str(data),
                                                                            split="train"),
                         processing_class=word_level_tokenizer())
    trainer.train()


def sft_trainer_peak_bytes(data: Path, output_dir: Path, config: dict) -> int:
    """The allocator's account of `run_sft_trainer`, in a fresh process.

    In a process that has run this before, the profiler's memory events miss the next model's weights
    (seen here: the second run's account enters its first training step at 24 KB live, the first run's
    at the weights' 9.4 MB; why, not found); the first build in a process is counted whole.
    """
    script = ("import json, sys; from pathlib import Path; from tests.test_trainers import run_sft_trainer; "
              "from tests.reference_loop import allocator_peak_bytes; "
              "print(allocator_peak_bytes(lambda: run_sft_trainer(Path(sys.argv[1]), Path(sys.argv[2]), "
              "json.loads(sys.argv[3]))))")
    done = subprocess.run([sys.executable, "-c", script, str(data), str(output_dir), json.dumps(config)],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    return int(done.stdout.strip().splitlines()[-1])


def trl_spec(**extra) -> ProbeSpec:
    return ProbeSpec(model=FIELDS, seq_len=SEQ_LEN, capacity_bytes=1 << 32, trainer="trl", collation="flattened",
                     effective_batch=MICRO_BATCH * ACCUMULATION, **extra)


@pytest.mark.slow  # ~20 s: a real SFTTrainer run, the trial and the estimate
def test_trl_trial_equals_sft_trainer_with_padding_free_batches(tmp_path):
    from fitprobe.probe.export import export_plan
    from fitprobe.probe.plan import make_plan

    data = tmp_path / "train.jsonl"
    write_jsonl(data, MICRO_BATCH * ACCUMULATION * STEPS, SEQ_LEN)
    spec = trl_spec()
    plan = make_plan(MICRO_BATCH * ACCUMULATION, MICRO_BATCH)
    config = export_plan(plan.facts(), spec, "trl")["config"]
    assert (config["per_device_train_batch_size"], config["gradient_accumulation_steps"]) == (MICRO_BATCH,
                                                                                               ACCUMULATION)
    expected = sft_trainer_peak_bytes(data, tmp_path / "out", config)
    trial = run_trial(spec, MICRO_BATCH).as_json()["trial"]
    assert trial["fits"]
    assert trial["peak_allocated_bytes"] == pytest.approx(expected, rel=TOLERANCE)
    estimate = run_trial(trl_spec(mode="estimate"), MICRO_BATCH).as_json()["trial"]
    assert estimate["peak_allocated_bytes"] == trial["peak_allocated_bytes"]


@pytest.mark.gpu
def test_trl_trial_equals_sft_trainer_on_this_card(tmp_path):
    """On CUDA TRL's fused head takes its Triton path (labelled positions only); fitprobe's trial runs TRL's code
    there too, and the CUDA allocator counts both."""
    from fitprobe.probe.export import export_plan
    from fitprobe.probe.plan import make_plan

    data = tmp_path / "train.jsonl"
    write_jsonl(data, MICRO_BATCH * ACCUMULATION * STEPS, SEQ_LEN)
    spec = trl_spec(device="cuda:0")
    config = export_plan(make_plan(MICRO_BATCH * ACCUMULATION, MICRO_BATCH).facts(), spec, "trl")["config"]
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_sft_trainer(data, tmp_path / "out", config, use_cpu=False)
    measured = torch.cuda.max_memory_allocated() - base
    torch.cuda.empty_cache()
    trial = run_trial(spec, MICRO_BATCH).as_json()["trial"]
    assert trial["peak_allocated_bytes"] == pytest.approx(measured, rel=TOLERANCE), torch.cuda.get_device_name(0)


@pytest.mark.parametrize("collation", ["flattened", "packed", "padded"])
def test_trl_export_builds_an_sft_config_that_trains_the_measured_step(tmp_path, collation):
    """SFTConfig's own defaults (gradient checkpointing and bf16 on, packing's bfd strategy) are overridden."""
    from trl import SFTConfig

    from fitprobe.probe.export import export_plan
    from fitprobe.probe.plan import make_plan

    spec = ProbeSpec(model=FIELDS, precision="fp32", collation=collation, seq_len=512, liger=True, trainer="trl",
                     mode="estimate", capacity_bytes=1 << 32)
    exported = export_plan(make_plan(32, 8).facts(), spec, "trl")
    config = exported["config"]
    assert not any("--trainer trl" in note for note in exported["provenance"].get("notes", []))
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, **config)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, 4)
    assert args.gradient_checkpointing is False and args.bf16 is False and args.use_liger_kernel is True
    assert args.loss_type == "nll"
    expected = {"flattened": (True, False, None), "packed": (False, True, 512), "padded": (False, False, 512)}
    assert (args.padding_free, args.packing, args.max_length) == expected[collation]
    if collation == "packed":  # fitprobe's packed rows: seq_len tokens, causal across the row, no position ids
        assert args.packing_strategy == "wrapped"


def test_trainer_trl_and_liger_refuse_what_their_code_cannot_run():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="trainer trl adds TRL's fused LM head to a transformers model"):
        ProbeSpec(model="builtin:gpt-tiny", seq_len=64, trainer="trl")
    with pytest.raises(ValidationError, match="add --estimate"):
        ProbeSpec(model=FIELDS, seq_len=64, liger=True)


# Llama at a 32k vocabulary: Liger's patches (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) apply to it
LIGER_FIELDS = dict(model_type="llama", vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                    tie_word_embeddings=False)
LIGER_SEQ_LEN, LIGER_MICRO_BATCH = 512, 4


def estimate_peaks_in_a_fresh_process(specs: list[dict]) -> list[int]:
    """Liger patches the family's modeling module for the whole process (as in a training script): run apart."""
    script = ("import json, sys; from fitprobe.probe.job import run_trial; from fitprobe.probe.spec import ProbeSpec; "
              "print(json.dumps([run_trial(ProbeSpec(**s), int(sys.argv[2])).as_json()['trial']['peak_allocated_bytes'] "
              "for s in json.loads(sys.argv[1])]))")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(specs), str(LIGER_MICRO_BATCH)],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~30 s: two estimates of a 32k-vocabulary model at 2048 tokens, in a subprocess
def test_liger_estimate_is_below_the_plain_heads_by_the_logits_it_never_builds():
    """Hand count: the plain head holds the [BT, V] logits in fp32 (its log-probabilities beside them at the
    peak); Liger's fused linear cross-entropy holds one [chunk, V] chunk, chunk = next_power_of_2(ceil(BT /
    ceil(V / H))) = next_power_of_2(ceil(2048 / 125)) = 32 rows, i.e. 4 MB instead of 262 MB."""
    base = dict(model=LIGER_FIELDS, seq_len=LIGER_SEQ_LEN, capacity_bytes=1 << 34, mode="estimate")
    plain, liger = estimate_peaks_in_a_fresh_process([base, {**base, "liger": True}])
    tokens, vocab = LIGER_MICRO_BATCH * LIGER_SEQ_LEN, LIGER_FIELDS["vocab_size"]
    assert plain - liger >= tokens * vocab * 4


@pytest.mark.gpu
def test_liger_estimate_equals_the_liger_loop_on_this_card():
    """On a card Liger's kernels run: the HF loop with transformers' apply_liger_kernel, counted by the CUDA
    allocator, against the estimate (fake CUDA tensors there, so Liger's host code takes its CUDA branches)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.liger import apply_liger_kernel

    from tests.reference_loop import hf_trainer_optimizer

    fields = dict(LIGER_FIELDS)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields),
                                             attn_implementation="sdpa").cuda().train()
    apply_liger_kernel(model, {"fused_linear_cross_entropy": True})
    optimizer = hf_trainer_optimizer("adamw_torch_fused", list(model.parameters()))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, LIGER_FIELDS["vocab_size"], (LIGER_MICRO_BATCH, LIGER_SEQ_LEN),
                             generator=generator).cuda() for _ in range(2)]
    for _ in range(2):
        for ids in batches:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss / 2
            loss.backward()
            del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated() - base
    name = torch.cuda.get_device_name(0)
    spec = dict(model=LIGER_FIELDS, seq_len=LIGER_SEQ_LEN, mode="estimate", liger=True, collation="packed",
                capacity_bytes=torch.cuda.get_device_properties(0).total_memory)
    estimate = run_trial(ProbeSpec(**spec), LIGER_MICRO_BATCH).as_json()["trial"]["peak_allocated_bytes"]
    assert estimate == pytest.approx(measured, rel=0.01), name


def test_a_trl_report_says_which_sft_config_defaults_fitprobe_did_not_follow():
    tiny = dict(FIELDS, hidden_size=64, intermediate_size=128, head_dim=16)
    report = run_trial(ProbeSpec(model=tiny, seq_len=32, capacity_bytes=1 << 30, trainer="trl", mode="estimate"),
                       1).as_json()
    assert report["trainer"]["trainer"] == "TRL SFTTrainer (loss_type nll)"
    assert "gradient_checkpointing=True" in report["trainer"]["note"]
    assert "gradient_checkpointing=False" in report["trainer"]["note"]


def test_a_trl_export_of_a_plan_measured_with_the_hf_step_says_to_probe_the_trl_step():
    from fitprobe.probe.export import export_plan
    from fitprobe.probe.plan import make_plan

    exported = export_plan(make_plan(32, 8).facts(), ProbeSpec(seq_len=512), "trl")
    assert any("probe with --trainer trl" in note for note in exported["provenance"]["notes"])
