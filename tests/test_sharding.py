"""sharding=fsdp: FSDP2 measured on real gloo ranks, estimated as one rank of a fake group, and the two agree.

The measured side is the reference: `num_devices` processes, each counting its own live bytes. The
estimate runs the same build (`build_sharded_model`) and the same trial in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fitprobe.probe.cli import EXIT_BAD_INPUT, main
from fitprobe.probe.estimate.fake import EstimateMeter
from fitprobe.probe.job import run_job, run_probe
from fitprobe.probe.meter import CpuMeter, Meter, round_allocation
from fitprobe.probe.models.load import build_model
from fitprobe.probe.verify.ranks import spawn_ranks
from fitprobe.probe.sharded_trial import EstimatedShardedTrial, MeasuredShardedTrial
from fitprobe.probe.sharding import build_sharded_model, process_group, transformer_blocks
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.step import accumulate_gradients, make_optimizer, worst_case_batch
from fitprobe.probe.trial import TrialRunner

# Two blocks and the root (embeddings, final norm, head): three FSDP groups, each gathered, resharded and its
# gradients reduce-scattered in turn, as in a deep model; each block more costs every gloo rank and every fake
# trial the same again
LLAMA = {"model_type": "llama", "vocab_size": 2000, "hidden_size": 128, "intermediate_size": 256,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
SEQ_LEN = 128
CAPACITY = "100MiB"
MICRO_BATCH = 4


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """A tiny model on a shared 2-core machine: extra intra-op threads only fight each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def llama(num_devices: int, precision: str = "fp32", **fields: Any) -> ProbeSpec:
    return ProbeSpec(model=dict(LLAMA), seq_len=SEQ_LEN, capacity_bytes=CAPACITY, sharding="fsdp",
                     num_devices=num_devices, precision=precision, **fields)


def device_numbers(spec: ProbeSpec, meter: Meter) -> dict[str, Any]:
    """What one device holds: weights once sharded, weights + gradients + AdamW state after one
    optimizer step (gradients not yet zeroed), and THE trial's peak at MICRO_BATCH."""
    model = build_sharded_model(spec, meter)
    weights_bytes = meter.allocated_bytes()
    batches = [worst_case_batch(model.vocab_size, 1, spec, meter.device) for _ in range(2)]
    optimizer = make_optimizer(spec, model.module)
    with meter.tracking():
        accumulate_gradients(model, batches, spec)
        optimizer.step()
        states_bytes = meter.allocated_bytes()
        optimizer.zero_grad(set_to_none=True)
    del optimizer
    meter.release()
    with meter.tracking():
        trial = TrialRunner(spec, meter, model)(MICRO_BATCH)
    return {"weights_bytes": weights_bytes, "states_bytes": states_bytes, "trial": trial.to_dict()}


def _numbers_rank(rank: int, world_size: int, spec_json: dict[str, Any], out_dir: str) -> None:
    spec = ProbeSpec.model_validate(spec_json)
    numbers = device_numbers(spec, CpuMeter(spec.capacity_bytes))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(numbers))


_measured: dict[tuple[int, str], list[dict[str, Any]]] = {}


def measured(num_devices: int, precision: str = "fp32") -> list[dict[str, Any]]:
    """Every gloo rank's numbers (spawned once per size and precision in this test session)."""
    key = (num_devices, precision)
    if key not in _measured:
        spec = llama(num_devices, precision=precision)
        with tempfile.TemporaryDirectory() as out_dir:
            spawn_ranks(_numbers_rank, num_devices, "cpu", (spec.model_dump(mode="json"), out_dir))
            _measured[key] = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(num_devices)]
    return _measured[key]


def estimated(num_devices: int, precision: str = "fp32") -> dict[str, Any]:
    spec = llama(num_devices, precision=precision, mode="estimate")
    with process_group(num_devices):
        return device_numbers(spec, EstimateMeter(spec.capacity_bytes))


def parameter_shapes() -> list[torch.Size]:
    module = build_model(llama(1), "meta").module
    return [p.shape for p in module.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize(("num_devices", "precision"), [(2, "fp32"), (4, "fp32"), (2, "bf16-mixed")])
def test_estimated_per_device_peak_equals_every_measured_rank(num_devices, precision):
    ranks = measured(num_devices, precision)
    estimate = estimated(num_devices, precision)
    assert all(rank["trial"]["fits"] for rank in ranks) and estimate["trial"]["fits"]
    for rank in ranks:
        assert estimate["trial"]["peak_allocated_bytes"] == pytest.approx(rank["trial"]["peak_allocated_bytes"],
                                                                           rel=0.01)
        for phase, n_bytes in rank["trial"]["phase_peak_bytes"].items():
            assert estimate["trial"]["phase_peak_bytes"][phase] == pytest.approx(n_bytes, rel=0.01)
        assert estimate["weights_bytes"] == rank["weights_bytes"]
        assert estimate["states_bytes"] == pytest.approx(rank["states_bytes"], rel=0.01)


@pytest.mark.slow
def test_model_states_per_device_fall_as_one_over_n():
    """fp32 AdamW: 4 bytes of weights per parameter, then + 4 of gradient + 8 of moments, over N.

    What is not divided: the rotary buffers (two 16-float tensors, 512 bytes each once rounded to the
    allocator's blocks) stay whole on every device; each shard is its own storage rounded up to 512
    bytes (21 parameters), the gradients one storage per shard group; no padding, as every first
    dimension (2000, 256, 128, 64) divides by 1, 2 and 4.
    """
    shapes = parameter_shapes()
    parameter_count = sum(shape.numel() for shape in shapes)
    buffers_bytes = 2 * 512
    for n in (1, 2, 4):
        ranks = measured(n)
        weights = {rank["weights_bytes"] for rank in ranks}
        assert len(weights) == 1, "every rank holds an equal shard"
        weights_bytes = weights.pop()
        exact_weights_bytes = sum(round_allocation(shape.numel() // n * 4) for shape in shapes) + buffers_bytes
        assert weights_bytes == exact_weights_bytes
        assert weights_bytes == pytest.approx(4 * parameter_count / n, rel=0.01)
        states_bytes = max(rank["states_bytes"] for rank in ranks)
        # weights + gradients + two moments, within rounding and the loss scalar
        assert states_bytes == pytest.approx(16 * parameter_count / n, rel=0.01)
    one, two, four = (measured(n)[0]["states_bytes"] for n in (1, 2, 4))
    assert two / one == pytest.approx(1 / 2, rel=0.01) and four / one == pytest.approx(1 / 4, rel=0.01)


@pytest.mark.slow
def test_search_under_sharding_finds_the_true_max_measured_on_gloo_ranks():
    spec = llama(2, mode="estimate")
    found = run_probe(spec).as_json()["search"]["max_micro_batch"]
    assert found > MICRO_BATCH
    # the ranks are the reference: the estimate's own boundary at `found` is the search's (tests/test_search.py)
    ranks = MeasuredShardedTrial(llama(2))
    at_max, above = ranks(found), ranks(found + 1)
    assert at_max.fits, "the estimated max must fit on the real ranks"
    assert not above.fits and "out of memory" in above.error


def test_fsdp_beats_ddp_where_model_states_dominate():
    """Full fine-tuning, 4 devices, a capacity that the unsharded weights + AdamW state nearly fill."""
    capacity = "28MiB"
    four_blocks = dict(LLAMA, num_hidden_layers=4)  # 16.8 MiB of weights + AdamW state, unsharded
    plain = ProbeSpec(precision="fp32", model=four_blocks, seq_len=SEQ_LEN, capacity_bytes=capacity, num_devices=4,
                      mode="estimate")
    ddp = run_probe(plain).as_json()["search"]["max_micro_batch"]
    fsdp = run_probe(plain.model_copy(update={"sharding": "fsdp"})).as_json()["search"]["max_micro_batch"]
    assert ddp == 1
    assert fsdp == 3
    assert not torch.distributed.is_initialized(), "the fake group must not outlive the estimate"


def test_blocks_are_found_through_every_wrapper():
    spec = ProbeSpec(precision="fp32", model=dict(LLAMA), seq_len=SEQ_LEN)
    hf = build_model(spec, "meta").module
    assert transformer_blocks(hf) == list(hf.model.layers)
    gpt = build_model(ProbeSpec(precision="fp32", model="builtin:gpt-nano"), "meta").module
    assert transformer_blocks(gpt) == list(gpt.blocks)
    lora = build_model(spec.model_copy(update={"finetuning": "lora"}), "meta").module
    assert [type(b).__name__ for b in transformer_blocks(lora)] == ["LlamaDecoderLayer"] * LLAMA["num_hidden_layers"]
    assert transformer_blocks(nn.Sequential(nn.Linear(2, 2))) == []


def test_lora_bf16_mixed_estimate_runs_sharded():
    spec = llama(2, mode="estimate", finetuning="lora", precision="bf16-mixed")
    result = EstimatedShardedTrial(spec)(2)
    assert result.fits and result.peak_allocated_bytes > 0


def test_combinations_not_modelled_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="use bf16-mixed"):
        llama(2, precision="fp16-mixed")
    with pytest.raises(ValueError, match="--no-verify"):
        run_job(llama(2, effective_batch=8)).as_json()
    with pytest.raises(SystemExit) as exit_:
        main(["probe", "--sharding", "tp", "--devices", "2"])
    assert exit_.value.code == EXIT_BAD_INPUT


def test_the_cli_takes_sharding(capsys):
    with tempfile.NamedTemporaryFile("w", suffix=".json") as config:
        json.dump(LLAMA, config)
        config.flush()
        code = main(["trial", "--model", f"hf:{config.name}", "--seq-len", str(SEQ_LEN), "--sharding", "fsdp",
                     "--devices", "2", "--estimate", "--capacity", CAPACITY, "--micro-batch", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["spec"]["sharding"] == "fsdp"
    assert report["model"]["sharded_over_devices"] == 2 and report["trial"]["fits"]


# Runs the CLI, then reports the process's own peak RSS (VmHWM, as in test_estimate.py).
RUN_AND_REPORT_PEAK_RSS = """
import sys
from fitprobe.probe.cli import main
code = main(sys.argv[1:])
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(f"peak_rss_kib={hwm_kib}", file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.slow
def test_an_8b_full_fine_tune_over_8_h100s_is_answered_on_a_laptop():
    started_s = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", RUN_AND_REPORT_PEAK_RSS, "probe", "--model", "preset:llama-3.1-8b", "--seq-len", "4096",
         "--precision", "bf16-mixed", "--sharding", "fsdp", "--devices", "8", "--estimate", "--gpu", "h100-80gb",
         "--no-verify", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    wall_s = time.perf_counter() - started_s
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    peak_rss_kib = int(run.stderr.rsplit("peak_rss_kib=", 1)[1].split()[0])
    print(f"8B fsdp×8 estimate: max micro-batch {report['search']['max_micro_batch']}, {wall_s:.1f}s, "
          f"peak RSS {peak_rss_kib / 2**20:.2f} GiB")
    assert report["search"]["max_micro_batch"] >= 1
    assert peak_rss_kib * 1024 < 2**30, "fake weights must not be materialised"
    # its time is printed, not asserted: a busy host would fail a timer (speed goals live in bench/)
