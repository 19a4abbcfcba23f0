"""One function per batch-size finder, each answering "largest micro-batch" for the same spec.

Every finder trains the same model (probe/models/load.py) on the same worst-case batches. fitprobe,
Accelerate and Lightning run fitprobe's training step (probe/step.py); batch-probe runs its own
(one forward/backward and one AdamW step per trial), which is part of what is being compared.
On the CPU the meter is fitprobe's virtual-capacity CpuMeter, whose torch.OutOfMemoryError the
other tools catch as they would a CUDA one (Lightning only recognises messages that name CUDA, so
its adapter re-raises the CPU meter's error in CUDA's words).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

from fitprobe.probe.build import prepare
from fitprobe.probe.job import run_probe
from fitprobe.probe.meter import is_oom
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.step import accumulate_gradients, make_optimizer, make_scaler, optimizer_step, worst_case_batch
from fitprobe.probe.trial import TrialRunner


def _timed(meter: Any, started_s: float) -> float:
    meter.synchronize()
    return round(time.perf_counter() - started_s, 3)


def fitprobe_finder(spec: ProbeSpec) -> dict[str, Any]:
    started_s = time.perf_counter()
    search = run_probe(spec).search
    return {"answer": search.max_micro_batch, "safe": search.safe_micro_batch,
            "trials": search.trial_count, "wall_s": round(time.perf_counter() - started_s, 3)}


def accelerate_finder(spec: ProbeSpec) -> dict[str, Any]:
    """Accelerate's decorator from its default start (128), halving on every OOM."""
    from accelerate.utils import find_executable_batch_size

    started_s = time.perf_counter()
    meter, model = prepare(spec)
    runner = TrialRunner(spec, meter, model)
    tried: list[int] = []

    @find_executable_batch_size(starting_batch_size=128)
    def train(batch_size: int) -> int:
        tried.append(batch_size)
        result = runner(batch_size)
        if not result.fits:  # the trial caught it; Accelerate needs to see it
            raise torch.OutOfMemoryError(f"CUDA out of memory. {result.error}")
        return batch_size

    with meter.tracking():
        answer = train()
    return {"answer": answer, "trials": len(tried), "tried": tried, "wall_s": _timed(meter, started_s)}


def batch_probe_finder(spec: ProbeSpec) -> dict[str, Any]:
    """batch-probe's binary search over [1, 4096] with its own one-step training trial, no headroom."""
    from batch_probe import probe_batch_size

    started_s = time.perf_counter()
    meter, model = prepare(spec)
    tried: list[int] = []

    class WithLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model.module

        def forward(self, input_ids, labels, attention_mask):
            logits = model.logits(self.inner, input_ids, attention_mask)
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def inputs(batch_size: int) -> dict[str, torch.Tensor]:
        tried.append(batch_size)
        batch = worst_case_batch(model.vocab_size, batch_size, spec, meter.device)
        return {"input_ids": batch.input_ids, "labels": batch.labels, "attention_mask": batch.attention_mask}

    with meter.tracking():
        answer = probe_batch_size(WithLoss(), inputs, headroom=0.0, device=meter.device, verbose=False)
    return {"answer": answer, "trials": len(tried), "tried": tried, "wall_s": _timed(meter, started_s)}


def lightning_finder(spec: ProbeSpec) -> dict[str, Any]:
    """Lightning's Tuner.scale_batch_size(mode="binsearch") on a LightningModule around THE step."""
    import lightning as L
    from lightning.pytorch.tuner import Tuner
    from torch.utils.data import DataLoader, Dataset

    started_s = time.perf_counter()
    meter, model = prepare(spec)
    tried: list[int] = []

    class Worst(Dataset):
        def __len__(self) -> int:
            return 1 << 20

        def __getitem__(self, index: int) -> int:
            return index

    class StepModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model.module
            self.batch_size = 2
            self.automatic_optimization = False

        def train_dataloader(self) -> DataLoader:
            return DataLoader(Worst(), batch_size=self.batch_size)

        def configure_optimizers(self):
            return make_optimizer(spec, self.inner)

        def training_step(self, indices, _):
            size = len(indices)
            if not tried or tried[-1] != size:
                tried.append(size)
            batches = [worst_case_batch(model.vocab_size, size, spec, meter.device)
                       for _ in range(spec.micro_steps_per_trial)]
            try:
                accumulate_gradients(model, batches, spec, make_scaler(spec, meter.device.type))
                optimizer_step(self.optimizers(), None)  # Lightning counts steps through its wrapper
            except RuntimeError as exc:
                if meter.device.type == "cpu" and is_oom(exc):
                    raise RuntimeError(f"CUDA out of memory (CPU virtual device). {exc}") from None
                raise

    # the tuner saves a .scale_batch_size_*.ckpt in the trainer's root dir: keep it out of the user's tree
    with tempfile.TemporaryDirectory(prefix="fitprobe-lightning-") as root_dir:
        trainer = L.Trainer(accelerator="gpu" if meter.device.type == "cuda" else "cpu", devices=1, max_steps=1000,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root_dir)
        with meter.tracking():
            answer = Tuner(trainer).scale_batch_size(StepModule(), mode="binsearch", init_val=2,
                                                     steps_per_trial=spec.optimizer_steps_per_trial, max_trials=30)
    return {"answer": answer, "trials": len(tried), "tried": tried, "wall_s": _timed(meter, started_s)}


def trains_without_oom(spec: ProbeSpec, micro_batch: int, optimizer_steps: int) -> bool:
    """The check behind every answer: does training at this micro-batch run, step after step?"""
    meter, model = prepare(spec)
    runner_spec = spec.model_copy(update={"optimizer_steps_per_trial": optimizer_steps})
    with meter.tracking():
        return TrialRunner(runner_spec, meter, model)(micro_batch).fits


FINDERS = {"fitprobe": fitprobe_finder, "accelerate": accelerate_finder,
           "lightning": lightning_finder, "batch-probe": batch_probe_finder}
