"""A user's tokenized dataset, as `datasets` writes it, read into the length profile the probe sizes batches from.

Expected values come from numpy on the lengths the test chose (quantiles, maxima, sums) and from
enumerating or sampling batches by hand, never from probe/data.py itself.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from fitprobe.probe.data import COLLATIONS, QUANTILES, expected_padding_fraction, read_profile, worst_batch
from fitprobe.probe.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]


def _skewed_lengths(rows: int = 5000, seed: int = 0) -> np.ndarray:
    """Chat-like data: most rows short, a long tail, and one row far longer than the rest."""
    lengths = np.random.default_rng(seed).lognormal(mean=4.5, sigma=1.0, size=rows).astype(np.int64)
    lengths[1234] = 7000
    lengths[77] = 0  # an empty row is a row
    return lengths


def _write(lengths: np.ndarray, fmt: str, directory: Path) -> Path:
    """`lengths` as users save a tokenized dataset; row i holds lengths[i] token ids."""
    if fmt == "lengths":
        path = directory / "rows.lengths"
        path.write_text("".join(f"{n}\n" for n in lengths))
        return path
    table = datasets.Dataset.from_dict({"text": ["x"] * len(lengths),
                                        "input_ids": [list(range(5, 5 + n)) for n in lengths]})
    if fmt == "parquet":
        table.to_parquet(directory / "rows.parquet", batch_size=700)  # several row groups
        return directory / "rows.parquet"
    if fmt == "jsonl":
        table.to_json(directory / "rows.jsonl")  # datasets writes JSON Lines
        return directory / "rows.jsonl"
    table.save_to_disk(directory / "saved", num_shards=3)  # rows span three arrow files
    return directory / "saved"


FORMATS = ("parquet", "jsonl", "save_to_disk", "lengths")


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, dict[str, Path]]:
    lengths = _skewed_lengths()
    directory = tmp_path_factory.mktemp("skewed")
    return lengths, {fmt: _write(lengths, fmt, directory) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_profile_matches_numpy_on_every_format(fmt: str, skewed: tuple[np.ndarray, dict[str, Path]]) -> None:
    lengths, paths = skewed
    calls: list[tuple[int, int, int]] = []
    profile = read_profile(paths[fmt], lambda *call: calls.append(call))
    assert (profile.rows, profile.total_tokens) == (len(lengths), int(lengths.sum()))
    assert (profile.min_tokens, profile.max_tokens) == (0, 7000)
    assert profile.mean_tokens == pytest.approx(lengths.mean(), rel=1e-12)
    assert dict(profile.quantiles) == {q: int(np.quantile(lengths, q, method="inverted_cdf")) for q in QUANTILES}
    assert profile.quantile(0.0) == 0 and profile.quantile(1.0) == 7000
    assert {n: int(c) for n, c in enumerate(profile.histogram) if c} == Counter(lengths.tolist())
    # the last report says the whole dataset was read
    assert calls[-1][0] == len(lengths) and calls[-1][1] == calls[-1][2] > 0


def test_worst_batch_is_the_longest_rows_cut_at_seq_len(skewed: tuple[np.ndarray, dict[str, Path]]) -> None:
    lengths, paths = skewed
    profile = read_profile(paths["lengths"])
    longest_four = sorted(lengths.tolist())[-4:][::-1]  # 7000 and the three next
    assert worst_batch(profile, "padded", 4, 8192).shape == (4, 7000)
    assert worst_batch(profile, "padded", 4, 2048).shape == (4, 2048)
    assert worst_batch(profile, "packed", 4, 2048).shape == (4, 2048)
    flattened = worst_batch(profile, "flattened", 4, 2048)
    assert flattened.sequence_lengths == tuple(min(n, 2048) for n in longest_four)
    assert flattened.shape == (1, sum(min(n, 2048) for n in longest_four))
    assert worst_batch(profile, "flattened", 4, 8192).shape == (1, sum(longest_four))


def test_a_micro_batch_larger_than_the_data_is_refused(tmp_path: Path) -> None:
    profile = read_profile(_write(np.array([3, 5]), "lengths", tmp_path))
    with pytest.raises(SpecError, match=r"micro-batch 3 is larger than the dataset \(2 rows\)"):
        worst_batch(profile, "padded", 3, 16)


def _enumerated_padding(lengths: list[int], micro_batch: int, seq_len: int) -> float:
    """Padding share over every ordered batch of independent draws, each batch equally likely."""
    slots = real = 0
    for batch in itertools.product([min(n, seq_len) for n in lengths], repeat=micro_batch):
        slots += micro_batch * max(batch)
        real += sum(batch)
    return 1 - real / slots


@pytest.mark.parametrize(("lengths", "micro_batch", "seq_len"),
                         [([1, 2, 2, 5], 2, 16), ([1, 2, 2, 5], 3, 4), ([7, 1, 1, 1, 30, 2], 4, 10), ([4], 1, 8)])
def test_expected_padding_equals_enumerating_every_batch(lengths: list[int], micro_batch: int, seq_len: int,
                                                         tmp_path: Path) -> None:
    profile = read_profile(_write(np.array(lengths), "lengths", tmp_path))
    expected = _enumerated_padding(lengths, micro_batch, seq_len)
    assert expected_padding_fraction(profile, "padded", micro_batch, seq_len) == pytest.approx(expected, abs=1e-12)


def test_expected_padding_on_skewed_data_agrees_with_sampled_batches(
        skewed: tuple[np.ndarray, dict[str, Path]]) -> None:
    lengths, paths = skewed
    profile = read_profile(paths["lengths"])
    capped = np.minimum(lengths, 1024)
    batches = np.random.default_rng(1).choice(capped, size=(200_000, 8))
    sampled = 1 - batches.sum() / (8 * batches.max(axis=1)).sum()
    assert expected_padding_fraction(profile, "padded", 8, 1024) == pytest.approx(sampled, abs=0.005)
    assert sampled > 0.5  # skewed data wastes most of a padded batch: the point of knowing it


def test_packed_wastes_only_the_last_row_and_flattened_nothing(tmp_path: Path) -> None:
    profile = read_profile(_write(np.array([3, 4]), "lengths", tmp_path))  # 7 tokens in 2 rows of 4
    assert expected_padding_fraction(profile, "packed", 2, 4) == pytest.approx(1 / 8)
    assert expected_padding_fraction(profile, "flattened", 2, 4) == 0.0
    assert set(COLLATIONS) == {"padded", "packed", "flattened"}


def _saved(rows: list[list[int] | None], directory: Path, shards: int = 1) -> Path:
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(directory / "saved", num_shards=shards)
    return directory / "saved"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])  # a copy cut short


@pytest.mark.parametrize(("write", "message"), [
    (lambda d: d.joinpath("a.jsonl").write_text('{"input_ids": [1]}\n\n{"input_ids": [1, 2]}\n{"ids": [3]}\n'),
     r"a\.jsonl: row 4 has no input_ids"),
    (lambda d: d.joinpath("a.jsonl").write_text('{"input_ids": [1]}\n{"input_ids": ["a", "b"]}\n'),
     r"a\.jsonl: row 2: input_ids must be a list of integers"),
    (lambda d: d.joinpath("a.jsonl").write_text('{"input_ids": [1]}\n{"input_ids": [1, true]}\n'),
     r"a\.jsonl: row 2: input_ids must be a list of integers"),
    (lambda d: d.joinpath("a.jsonl").write_text('{"input_ids": [1]}\n{"input_ids": [1,\n'),
     r"a\.jsonl: row 2 is not JSON"),
    (lambda d: d.joinpath("a.txt").write_text("5\n7\n-3\n"), r"a\.txt: row 3 is a negative length"),
    (lambda d: d.joinpath("a.txt").write_text("5\n7.5\n"), r"a\.txt: row 2 is not a whole number"),
    (lambda d: d.joinpath("a.txt").write_text("5\n" + "9" * 30 + "\n"), r"a\.txt: row 2 has 9{30} tokens, more than 4194304"),
    (lambda d: d.joinpath("a.jsonl").write_text('{"input_ids": [1]}\n' * 2 + json.dumps({"input_ids": [0] * (2**22 + 1)})),
     r"a\.jsonl: row 3 has 4194305 tokens, more than 4194304; cut rows to your seq_len"),
    (lambda d: datasets.Dataset.from_dict({"input_ids": [[1], [2, 3], None]}).to_parquet(d / "a.parquet"),
     r"a\.parquet: row 3: input_ids is missing"),
    (lambda d: d.joinpath("a.parquet").write_bytes(b"PAR1 is not enough"),
     r"a\.parquet: not a readable Parquet file after row 0"),
    (lambda d: datasets.Dataset.from_dict({"text": ["hi"]}).to_parquet(d / "a.parquet"),
     r"a\.parquet: row 1 has no input_ids column \(columns: text\)"),
    (lambda d: _saved([[1]] * 6 + [[1, None]] + [[2]] * 3, d, shards=2),  # row 7 is in the second file
     r"data-00001-of-00002\.arrow: row 7: input_ids holds a null"),
    (lambda d: _truncate(_saved([[1, 2]] * 10, d) / "data-00000-of-00001.arrow"),
     r"data-00000-of-00001\.arrow: not a readable arrow stream after row 0"),
    (lambda d: datasets.Dataset.from_dict({"input_ids": [["a"]]}).save_to_disk(d / "saved"),
     r"row 1: input_ids must be a list of integers \(column type list<item: string>\)"),
    (lambda d: datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[1]]})}).save_to_disk(d / "saved"),
     r"holds the splits train; give one split's directory"),
])
def test_a_malformed_dataset_names_the_file_and_row(write, message: str, tmp_path: Path) -> None:
    write(tmp_path)
    (path,) = [p for p in tmp_path.iterdir()]
    with pytest.raises(SpecError, match=message) as raised:
        read_profile(path)
    said = str(raised.value)
    assert said.startswith(str(path)) and "\n" not in said
    assert ("not a readable" in said) == ("not a readable" in message)  # a bad row is not called a damaged file


_READ_AND_MEASURE = """
import json, resource, sys, time
from fitprobe.probe.data import read_profile
calls = []
before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
profile = read_profile(sys.argv[1], lambda *call: calls.append((time.monotonic(), *call)))
grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib
print(json.dumps({"grown_mib": grown_kib / 1024, "calls": calls, "rows": profile.rows, "max": profile.max_tokens}))
"""


@pytest.mark.slow
def test_a_1gb_jsonl_is_read_in_bounded_memory_with_progress(tmp_path: Path) -> None:
    lines = "".join(json.dumps({"input_ids": list(range(10_000, 10_000 + n))}) + "\n" for n in (50, 900, 3000, 120))
    block = lines * (2**20 // len(lines))  # about 1 MiB of rows
    path = tmp_path / "big.jsonl"
    with path.open("w") as file:
        for _ in range(1024):
            file.write(block)
    rows = 4 * (2**20 // len(lines)) * 1024
    run = subprocess.run([sys.executable, "-c", _READ_AND_MEASURE, str(path)], capture_output=True, text=True,
                         check=False, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["rows"], result["max"]) == (rows, 3000)
    assert result["grown_mib"] < 200, f"reading a {path.stat().st_size >> 20} MiB file grew RSS by {result['grown_mib']:.0f} MiB"
    times, progress = [c[0] for c in result["calls"]], [c[1:] for c in result["calls"]]
    assert len(progress) >= 3 and progress[-1] == [rows, path.stat().st_size, path.stat().st_size]
    assert all(later - earlier >= 0.45 for earlier, later in itertools.pairwise(times[:-1]))  # not a flood
    assert [p[1] for p in progress] == sorted(p[1] for p in progress)  # bytes only go forward
