"""fitprobe against the batch-size finders users would otherwise pick, side by side, in one run.

    python bench/compare_finders.py --device cuda:0 --repetitions 3 --out bench/results/gpu-h100.json
    python bench/compare_finders.py --cpu-smoke --out /tmp/smoke.json      # tiny models, CPU meter

Every tool run and every truth check happens in a fresh process, so one tool's cached allocator
state or leaked tensors cannot help or hurt another. The true maximum is found by trials in fresh
processes around the answers (B fits, B+1 does not); every answer is then trained for 50 optimizer
steps (`--check-steps`) (and fitprobe's safe micro-batch too) to see whether it really runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_CASES = [
    {"name": "gpt2 seq1024", "model": "preset:gpt2", "seq_len": 1024},
    {"name": "gpt2-medium seq2048", "model": "preset:gpt2-medium", "seq_len": 1024, "note": "gpt2's context is 1024"},
    {"name": "llama-3.2-1b seq2048 bf16-mixed", "model": "preset:llama-3.2-1b", "seq_len": 2048,
     "precision": "bf16-mixed"},
    {"name": "llama-3.2-1b LoRA seq2048", "model": "preset:llama-3.2-1b", "seq_len": 2048,
     "precision": "bf16-mixed", "finetuning": "lora"},
    {"name": "gpt2-medium checkpointing", "model": "preset:gpt2-medium", "seq_len": 1024,
     "gradient_checkpointing": True},
]
CPU_CASES = [
    {"name": "gpt-nano seq64 24MiB", "model": "builtin:gpt-nano", "seq_len": 64, "capacity_bytes": 24 << 20},
    {"name": "gpt-tiny LoRA seq128 48MiB", "model": "builtin:gpt-tiny", "seq_len": 128, "capacity_bytes": 48 << 20,
     "finetuning": "lora"},
]
CHECK_STEPS = 50


def _spec(case: dict[str, Any], device: str):
    from fitprobe.probe.spec import ProbeSpec

    return ProbeSpec(device=device, **{"precision": "fp32",  # the recorded results predate the bf16-mixed default
                                        **{k: v for k, v in case.items() if k not in ("name", "note")}})


def _in_fresh_process(*args: str) -> Any:
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=3600)
    if run.returncode != 0:
        return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def _child(args: argparse.Namespace) -> None:
    """One tool, or one check, in this (fresh) process; prints one JSON line."""
    from bench.finders import FINDERS, trains_without_oom

    spec = _spec(json.loads(args.case), args.device)
    if args.tool:
        print(json.dumps(FINDERS[args.tool](spec)))
    else:
        print(json.dumps({"fits": trains_without_oom(spec, args.micro_batch, args.steps)}))


def fits(case: dict[str, Any], device: str, micro_batch: int, steps: int = 2) -> bool:
    if micro_batch < 1:
        return True
    result = _in_fresh_process("--child", "--case", json.dumps(case), "--device", device,
                               "--micro-batch", str(micro_batch), "--steps", str(steps))
    return bool(result.get("fits"))


def true_maximum(case: dict[str, Any], device: str, start: int) -> int:
    """Walk from an answer to the b where b fits and b+1 does not, one fresh process per trial."""
    b = start
    while not fits(case, device, b):
        b -= 1
    while fits(case, device, b + 1):
        b += 1
    return b


def run_case(case: dict[str, Any], device: str, tools: list[str], repetitions: int,
             check_steps: int = CHECK_STEPS) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
    for _ in range(repetitions):
        for tool in tools:  # interleaved, so drift on a shared machine hits every tool alike
            runs[tool].append(_in_fresh_process("--child", "--tool", tool, "--case", json.dumps(case),
                                                "--device", device))
    fitprobe_answer = runs["fitprobe"][0].get("answer", 1)
    truth = true_maximum(case, device, fitprobe_answer)
    checked: dict[int, bool] = {}

    def trains(micro_batch: int) -> bool:
        """Tools that agree share one check: the same micro-batch in a fresh process is the same question."""
        if micro_batch not in checked:
            checked[micro_batch] = fits(case, device, micro_batch, check_steps)
        return checked[micro_batch]

    summary = {}
    for tool, results in runs.items():
        ok = [r for r in results if "answer" in r]
        if not ok:
            summary[tool] = {"error": results[0].get("error")}
            continue
        answer = ok[0]["answer"]
        summary[tool] = {
            "answer": answer, "answers": [r["answer"] for r in ok],
            "distance_to_true_max": answer - truth,
            "trials_median": statistics.median(r["trials"] for r in ok),
            "wall_s_median": statistics.median(r["wall_s"] for r in ok),
            "wall_s_all": [r["wall_s"] for r in ok],
            f"trains_{check_steps}_steps": trains(answer),
        }
    safe = runs["fitprobe"][0].get("safe")
    if safe:
        summary["fitprobe"]["safe_answer"] = safe
        summary["fitprobe"][f"safe_trains_{check_steps}_steps"] = trains(safe)
    return {"case": case, "true_max_micro_batch": truth, "tools": summary, "raw": runs}


def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "date": datetime.now(timezone.utc).isoformat(), "device": device}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(device)
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as exc:  # noqa: BLE001 - the driver version is context, not a result
            info["driver"] = f"unknown ({type(exc).__name__})"
    else:
        info["device_name"] = f"cpu ({platform.machine()}), fitprobe CpuMeter virtual capacity"
    return info


def table(results: dict[str, Any]) -> str:
    steps = results.get("check_steps", CHECK_STEPS)
    lines = ["| case | true max | tool | answer | distance | trials (median) | wall s (median) | "
             f"{steps} steps ok |", "|---|---|---|---|---|---|---|---|"]
    for case in results["cases"]:
        for tool, row in case["tools"].items():
            if "error" in row:
                lines.append(f"| {case['case']['name']} | {case['true_max_micro_batch']} | {tool} | error: "
                             f"{row['error']} | | | | |")
                continue
            lines.append(f"| {case['case']['name']} | {case['true_max_micro_batch']} | {tool} | {row['answer']} | "
                         f"{row['distance_to_true_max']:+d} | {row['trials_median']} | {row['wall_s_median']:.2f} | "
                         f"{'yes' if row[f'trains_{steps}_steps'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU meter")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--only", default="", help="only the cases whose name contains this text")
    parser.add_argument("--tools", default="fitprobe,accelerate,lightning,batch-probe", help="comma-separated")
    parser.add_argument("--out", type=Path, required=False)
    parser.add_argument("--check-steps", type=int, default=CHECK_STEPS,
                        help="optimizer steps each answer is trained for (the smoke test's 3 hold the same peak: "
                             "the optimizer state exists from the first step on)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    device = "cpu" if args.cpu_smoke else args.device
    cases = [case for case in (CPU_CASES if args.cpu_smoke else GPU_CASES) if args.only in case["name"]]
    if not cases:
        parser.error(f"--only {args.only!r} matches no case")
    tools = args.tools.split(",")
    results = {"environment": environment(device), "check_steps": args.check_steps,
               "cases": [run_case(case, device, tools, args.repetitions, args.check_steps) for case in cases]}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
