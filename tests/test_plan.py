"""The plan: micro_batch × accumulation_steps × num_devices reaches the effective batch, exactly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fitprobe.probe.cli import EXIT_BAD_INPUT, EXIT_OK, main
from fitprobe.probe.plan import make_plan
from fitprobe.probe.spec import SpecError

requests = st.tuples(st.integers(1, 2000), st.integers(1, 64), st.integers(1, 8)).filter(lambda r: r[0] >= r[2])


def _even_exact_micro_batches(effective_batch: int, max_micro_batch: int, num_devices: int) -> list[int]:
    if effective_batch % num_devices:
        return []
    per_device = effective_batch // num_devices
    return [b for b in range(1, max_micro_batch + 1) if per_device % b == 0]


@settings(max_examples=300, deadline=None)
@given(requests)
def test_recommended_plan_is_exact_and_within_the_micro_batch_limit(request: tuple[int, int, int]) -> None:
    effective_batch, max_micro_batch, num_devices = request
    plan = make_plan(effective_batch, max_micro_batch, num_devices)
    layouts = [plan.device_micro_batches(rank) for rank in range(num_devices)]
    assert plan.split.exact and plan.facts().as_json()["effective_batch"] == effective_batch
    assert sum(map(sum, layouts)) == effective_batch
    assert all(1 <= b <= plan.split.micro_batch <= max_micro_batch for sizes in layouts for b in sizes)
    assert max(map(len, layouts)) == plan.facts().as_json()["accumulation_steps"]


@settings(max_examples=300, deadline=None)
@given(requests)
def test_an_even_exact_plan_is_found_whenever_one_exists(request: tuple[int, int, int]) -> None:
    effective_batch, max_micro_batch, num_devices = request
    evens = _even_exact_micro_batches(effective_batch, max_micro_batch, num_devices)
    plan = make_plan(effective_batch, max_micro_batch, num_devices).facts().as_json()
    offered = [plan] + plan["alternatives"]
    found = [p for p in offered if p["exact"] and p["last_micro_batch"] is None]
    if not evens:
        assert not found
        return
    assert found and all(p["micro_batch"] in evens for p in found)
    # the headline is one every framework runs as written: even whenever an even split is exact
    assert plan["last_micro_batch"] is None and plan["uneven_note"] is None
    assert plan["micro_batch"] * plan["accumulation_steps"] * num_devices == effective_batch
    assert all(alt["uneven_note"] for alt in plan["alternatives"] if alt["last_micro_batch"]), "uneven is labelled"


@settings(max_examples=200, deadline=None)
@given(requests)
def test_uneven_recommendation_comes_with_the_nearest_even_plans(request: tuple[int, int, int]) -> None:
    effective_batch, max_micro_batch, num_devices = request
    plan = make_plan(effective_batch, max_micro_batch, num_devices).facts().as_json()
    if plan["last_micro_batch"] is None:
        return
    assert effective_batch % num_devices, "an uneven headline only where no even split is exact"
    below, above = plan["nearest_below"], plan["nearest_above"]
    assert above["effective_batch"] > effective_batch and above["deviation_percent"] > 0
    if below is not None:
        assert below["effective_batch"] < effective_batch and below["deviation_percent"] < 0
    for near in filter(None, (below, above)):
        assert near["micro_batch"] <= max_micro_batch
        assert near["effective_batch"] == near["micro_batch"] * near["accumulation_steps"] * num_devices


def test_prime_effective_batch_gets_the_even_plan_and_the_faster_uneven_one_labelled() -> None:
    # 97 is prime: the only even exact split under 32 is 97 micro-batches of 1; 25 + 25 + 25 + 22 takes 4
    plan = make_plan(97, 32).facts().as_json()
    assert (plan["micro_batch"], plan["accumulation_steps"], plan["last_micro_batch"]) == (1, 97, None)
    uneven = next(alt for alt in plan["alternatives"] if alt["last_micro_batch"])
    assert (uneven["micro_batch"], uneven["accumulation_steps"], uneven["last_micro_batch"]) == (25, 4, 22)
    assert uneven["uneven_note"].startswith("uneven: ") and "HF Trainer" in uneven["uneven_note"]
    assert "the uneven 97 = 3 × 25 + 22" in plan["reason"]
    assert plan["nearest_below"]["effective_batch"] == 96 and plan["nearest_above"]["effective_batch"] == 98


def test_nine_by_seven_plus_one_is_not_the_headline_for_64_under_a_safe_nine() -> None:
    # the case: 64 = 7 × 9 + 1 was recommended and exported as 63; by hand, the even splits of
    # 64 with micro-batches ≤ 9 are 1, 2, 4 and 8, and 8 × 8 takes as few micro-steps as 7 × 9 + 1
    plan = make_plan(64, 9).facts().as_json()
    assert (plan["micro_batch"], plan["accumulation_steps"], plan["last_micro_batch"]) == (8, 8, None)


def test_effective_batch_not_divisible_by_devices_spreads_one_extra_example() -> None:
    plan = make_plan(10, 8, 3)
    assert [sum(plan.device_micro_batches(rank)) for rank in range(3)] == [4, 3, 3]
    assert "not a multiple of 3 devices" in plan.facts().reason


def test_even_split_recommended_when_it_needs_as_few_micro_steps() -> None:
    plan = make_plan(96, 40).facts().as_json()
    assert (plan["micro_batch"], plan["accumulation_steps"], plan["last_micro_batch"]) == (32, 3, None)
    throughputs = [alt["relative_throughput"] for alt in plan["alternatives"]]
    assert throughputs == sorted(throughputs, reverse=True)


def test_measured_step_times_drive_the_ranking() -> None:
    # a fixed 40 ms per micro-step: 32 × 2 is clearly faster than 16 × 4 and than the assumed model's pick
    measured_s = {b: 0.04 + 0.001 * b for b in (2, 4, 16, 32)}
    plan = make_plan(64, 32, step_s_by_micro_batch=measured_s)
    assert (plan.split.micro_batch, plan.split.accumulation_steps) == (32, 2)
    assert plan.facts().throughput_model.startswith("measured")
    assert make_plan(64, 32).facts().throughput_model.startswith("assumed")


def test_untrusted_timings_are_ignored_and_the_fewest_micro_steps_win() -> None:
    # the CPU case from the issue: trials at 2, 4 and 24 timed 0.17 s, 0.56 s, 1.51 s on a busy host
    noisy = {2: 0.17, 4: 0.56, 24: 1.51}
    plan = make_plan(24, 24, step_s_by_micro_batch=noisy, timings_trusted=False)
    assert (plan.split.micro_batch, plan.split.accumulation_steps) == (24, 1)
    assert plan.facts().throughput_model.startswith("assumed")
    assert make_plan(64, 20, timings_trusted=False).split.micro_batch == 16  # 16 × 4, not 1 × 64


def test_one_slow_small_trial_does_not_make_micro_batch_one_win() -> None:
    # per example 24 is cheapest; a line through the small trials would put b=1 at ~0 s
    plan = make_plan(24, 24, step_s_by_micro_batch={2: 0.17, 4: 0.56, 24: 1.51})
    assert plan.split.micro_batch == 24
    plan = make_plan(96, 24, step_s_by_micro_batch={2: 0.17, 4: 0.56, 24: 1.51})
    assert (plan.split.micro_batch, plan.split.accumulation_steps) == (24, 4)


def true_cost_s(b: int, fixed_s: float = 0.02) -> float:
    """A device's real micro-step time: a fixed launch cost plus a cost per example."""
    return fixed_s + 0.01 * b


@settings(max_examples=300, deadline=None)
@given(
    effective_batch=st.integers(1, 512),
    safe=st.integers(2, 64),
    noise=st.lists(st.floats(0.85, 1.15), min_size=4, max_size=4),
    slow_index=st.integers(0, 3),
    slow_factor=st.floats(1.0, 3.0),
    fixed_s=st.sampled_from([0.0, 0.02, 0.2]),
)
def test_noisy_timings_never_rest_on_an_extrapolation(effective_batch, safe, noise, slow_index, slow_factor,
                                                      fixed_s) -> None:
    measured_at = sorted({2, max(2, safe // 4), max(2, safe // 2), safe})
    timings = {}
    for i, b in enumerate(measured_at):
        timings[b] = true_cost_s(b, fixed_s) * noise[i] * (slow_factor if i == slow_index else 1.0)
    plan = make_plan(effective_batch, safe, step_s_by_micro_batch=timings)
    again = make_plan(effective_batch, safe, step_s_by_micro_batch=dict(reversed(list(timings.items()))))
    assert plan.facts().as_json() == again.facts().as_json()  # the same trials give the same plan
    split = plan.split
    assert split.effective_batch == effective_batch and split.even
    evens = [b for b in range(1, min(safe, effective_batch) + 1) if effective_batch % b == 0]
    if max(evens) >= 2:
        assert split.micro_batch >= 2, "never below the smallest measured micro-batch"
    # against the true cost: as fast as the best even exact plan, within the plan's own tolerance
    def true_step_s(micro_batches: list[int]) -> float:
        return sum(true_cost_s(b, fixed_s) for b in micro_batches)
    best = min(true_step_s([b] * (effective_batch // b)) for b in evens)
    assert true_step_s(plan.device_micro_batches(0)) <= best * 1.05


def test_learning_rate_guidance_is_labelled_linear_and_sqrt() -> None:
    guidance = make_plan(256, 32, reference_lr=1e-4, reference_batch=64).facts().as_json()["lr_guidance"]
    assert guidance["linear_scaled_lr"] == pytest.approx(4e-4)
    assert guidance["sqrt_scaled_lr"] == pytest.approx(2e-4)
    assert "Adam" in guidance["note"] and "SGD" in guidance["note"]
    assert make_plan(256, 32).facts().as_json()["lr_guidance"] is None


@pytest.mark.parametrize(("args", "field", "fix"), [
    ((4, 8, 8), "effective_batch (4) must be at least num_devices (8)", "use at most 4 devices"),
    ((64, 0, 1), "max_micro_batch must be at least 1 (got 0)", "lower seq_len"),
    ((64, 8, 0), "num_devices must be at least 1 (got 0)", ""),
])
def test_impossible_requests_say_what_to_change(args: tuple[int, int, int], field: str, fix: str) -> None:
    with pytest.raises(SpecError) as info:
        make_plan(*args)
    assert field in str(info.value) and fix in str(info.value)


def test_reference_lr_without_its_batch_is_refused() -> None:
    with pytest.raises(SpecError, match="reference_lr and reference_batch together"):
        make_plan(64, 8, reference_lr=1e-3)


def test_plan_cli_prints_json_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--effective-batch", "97", "--max-micro-batch", "32", "--devices", "1", "--json"])
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert code == EXIT_OK
    for key in ("micro_batch", "accumulation_steps", "num_devices", "effective_batch", "exact",
                "last_micro_batch", "alternatives", "reason", "deviation_percent"):
        assert key in plan
    assert plan["exact"] and plan["micro_batch"] * plan["accumulation_steps"] == 97 and plan["last_micro_batch"] is None


def test_plan_cli_text_and_bad_input_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--effective-batch", "64", "--max-micro-batch", "16", "--reference-lr", "0.001",
                 "--reference-batch", "32"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "plan: 64 = 4 × 16 (four micro-batches of 16)" in out and "sqrt-scaled" in out
    assert main(["plan", "--effective-batch", "2", "--max-micro-batch", "16", "--devices", "4"]) == EXIT_BAD_INPUT
    assert "--effective-batch (2) must be at least --devices (4)" in capsys.readouterr().err


def test_every_split_is_written_one_way_and_the_alternatives_table_has_a_header_per_column(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--effective-batch", "97", "--max-micro-batch", "32"]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "plan: 97 = 97 × 1 (97 micro-batches of 1)  [exact]"
    assert "  nearest below (even): 96 = 3 × 32 (three micro-batches of 32) (-1.03%)" in lines
    header = lines.index("  alternatives (by expected throughput):") + 1
    assert lines[header].split() == ["split", "micro-batch", "accumulation", "devices", "effective", "throughput",
                                     "deviation"]
    assert lines[header + 1].strip().startswith("96 = 3 × 32 (three micro-batches of 32)")
    # the uneven split is marked in the table, and the mark explained under it
    assert lines[header + 2].strip().startswith("97 = 3 × 25 + 22 (three micro-batches of 25, then one of 22) *")
    assert lines[header + 4].startswith("    * uneven: ")
    # what the CLI prints is each split's `equation`, the field the page and the verdict print too
    plan = make_plan(64, 33, 1).facts().as_json()
    for split in [plan, *plan["alternatives"]]:
        assert split["equation"].startswith(f"{split['effective_batch']} = ")
    uneven = next(alt for alt in plan["alternatives"] if alt["last_micro_batch"])
    assert uneven["equation"] == "64 = 1 × 33 + 31 (one micro-batch of 33, then one of 31)"

