"""The verification run trains the plan for real: gradients must equal the full-batch gradient."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fitprobe.probe.cli import EXIT_BAD_INPUT, EXIT_OK, main
from fitprobe.probe.verify.gradient_check import reference_gradient, relative_error
from fitprobe.probe.job import run_job
from fitprobe.probe.models.load import build_model
from fitprobe.probe.plan import Plan, Split, make_plan
from fitprobe.probe.report import PlanFacts
from fitprobe.probe.spec import ProbeSpec, SpecError
from fitprobe.probe.step import IGNORE_INDEX, accumulate_gradients, split
from fitprobe.probe.verify.checks import run_verification
from fitprobe.probe.verify.run import variable_length_batch

SEQ_LEN = 16


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """A tiny model on a shared 2-core machine: extra intra-op threads only fight each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _nano(precision: str = "fp32", **fields) -> ProbeSpec:
    return ProbeSpec(model="builtin:gpt-nano", seq_len=SEQ_LEN, precision=precision, **fields)


def _model_and_examples(count: int, seed: int = 0):
    spec = _nano(seed=seed)
    torch.manual_seed(seed)
    model = build_model(spec, "cpu")
    examples = variable_length_batch(model.vocab_size, count, SEQ_LEN, torch.device("cpu"),
                                     torch.Generator().manual_seed(seed))
    return spec, model, examples


def _params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.module.parameters() if p.requires_grad]


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 12), st.integers(1, 6), st.integers(0, 3))
def test_uneven_accumulation_equals_the_full_batch_gradient(count: int, micro_batch: int, seed: int) -> None:
    spec, model, examples = _model_and_examples(count, seed)
    reference = reference_gradient(model, model.module, [examples], spec)
    sizes = Split(micro_batch, 1, count, count).device_micro_batches(0)  # uneven when count % micro_batch
    accumulate_gradients(model, split(examples, sizes), spec)
    assert relative_error(_params(model), reference) < 1e-5


def test_naive_mean_per_micro_batch_is_visibly_wrong_on_padded_batches() -> None:
    spec, model, examples = _model_and_examples(6)
    assert len({int(n) for n in examples.attention_mask.sum(dim=1)}) > 1, "needs sequences of different lengths"
    reference = reference_gradient(model, model.module, [examples], spec)
    micro_batches = split(examples, [2, 2, 2])

    # the textbook recipe: mean loss of each micro-batch, divided by the accumulation steps
    for mb in micro_batches:
        logits = model.module(mb.input_ids)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), mb.labels.view(-1), ignore_index=IGNORE_INDEX)
        (loss / len(micro_batches)).backward()
    naive_error = relative_error(_params(model), reference)
    model.module.zero_grad(set_to_none=True)

    accumulate_gradients(model, micro_batches, spec)
    fitprobe_error = relative_error(_params(model), reference)
    assert naive_error > 1e-2
    assert fitprobe_error < 1e-5


def test_verification_of_an_uneven_plan_passes_every_check() -> None:
    spec = _nano(capacity_bytes="64MiB", effective_batch=11)
    # 11 = 2 × 4 + 3: the uneven alternative a loop that cuts batches itself runs (the headline is 11 × 1)
    split = Split(4, 1, 11, 11)
    plan = Plan(split, PlanFacts(**split.facts(), reason="uneven", throughput_model="none"))
    verification = run_verification(spec, plan, steps=3, fits_at_once=8).as_json()
    assert plan.facts().as_json()["last_micro_batch"] is not None
    assert verification["passed"], verification["checks"]
    assert {c["name"] for c in verification["checks"]} == {
        "no_oom", "memory_within_headroom", "finite_loss", "loss_decreases", "gradient_equivalence",
        "examples_per_step"}
    assert verification["grad_rel_error"] < 1e-5
    assert verification["reference_split"] == [8, 3]
    assert verification["losses"][-1] < verification["losses"][0]
    assert 0 < verification["peak_reserved_bytes"] <= verification["capacity_bytes"]
    assert verification["step_s"] > 0 and verification["tokens_per_s"] > 0
    assert verification["gradient_noise_scale"] is None or verification["gradient_noise_scale"] > 0
    note = verification["gradient_noise_note"]
    assert "noisy estimate" in note or "not estimated" in note


def test_verification_that_runs_out_of_memory_fails_and_says_so() -> None:
    spec = _nano(capacity_bytes="2MiB", effective_batch=8)
    verification = run_verification(spec, make_plan(8, 8), steps=2).as_json()
    checks = {c["name"]: c for c in verification["checks"]}
    assert not verification["passed"]
    assert not checks["no_oom"]["passed"] and "out of memory" in checks["no_oom"]["detail"]
    assert checks["gradient_equivalence"]["detail"].startswith("not run")


def test_one_verification_step_is_refused() -> None:
    with pytest.raises(SpecError, match="verify_steps must be at least 2"):
        run_verification(_nano(effective_batch=4), make_plan(4, 4), steps=1).as_json()


@pytest.mark.slow
def test_probe_plan_verify_with_two_gloo_processes() -> None:
    events: list[dict] = []
    spec = _nano(capacity_bytes="16MiB", effective_batch=13, num_devices=2)
    report = run_job(spec, events.append, verify_steps=2).as_json()
    plan, verification = report["plan"], report["verification"]
    assert plan["exact"] and plan["num_devices"] == 2 and plan["effective_batch"] == 13
    assert plan["micro_batch"] <= report["search"]["safe_micro_batch"]
    assert verification["passed"], verification["checks"]
    assert verification["num_devices"] == 2 and verification["examples_per_step"] == 13
    assert verification["grad_rel_error"] < 1e-5
    phases = [e["phase"] for e in events if e["type"] == "phase"]
    assert phases.index("probed") < phases.index("planning") < phases.index("verifying")


def test_probe_cli_plans_without_verifying_and_refuses_one_verify_step(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["probe", "--model", "builtin:gpt-nano", "--seq-len", str(SEQ_LEN), "--device", "cpu",
            "--capacity", "16MiB", "--effective-batch", "24"]
    assert main(args + ["--no-verify", "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["plan"]["effective_batch"] == 24 and report["verification"] is None
    assert main(args + ["--verify-steps", "1"]) == EXIT_BAD_INPUT
    assert "verify-steps must be at least 2" in capsys.readouterr().err


def test_probe_cli_prints_probe_plan_and_verification(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["probe", "--model", "builtin:gpt-nano", "--seq-len", str(SEQ_LEN), "--device", "cpu",
                 "--capacity", "16MiB", "--effective-batch", "10", "--verify-steps", "2"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "safe micro-batch:" in out and "plan: 10 = " in out and "verification: PASSED" in out


def test_dropout_does_not_break_the_gradient_check() -> None:
    """GPT-2's default dropout (0.1) draws different masks for two cuts of the same examples."""
    config = {"model_type": "gpt2", "vocab_size": 256, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 2}
    spec = ProbeSpec(precision="fp32", model=config, seq_len=32, capacity_bytes="64MiB", effective_batch=8)
    verification = run_verification(spec, make_plan(8, 4), steps=2).as_json()
    checks = {c["name"]: c for c in verification["checks"]}
    assert checks["gradient_equivalence"]["passed"], checks["gradient_equivalence"]["detail"]
