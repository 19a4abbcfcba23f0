"""A user's tokenized dataset, read streaming: how long its rows are, and what batches they make.

A probe at full seq_len answers "does the worst batch fit"; the user's data says what the worst
batch *is*. Padded collation pads each batch to its longest row, so a corpus of short chats never
builds a seq_len-wide batch; flattened collation concatenates rows, so its width is the sum of the
longest rows. Both follow from the length distribution alone, so that is all this module keeps.

The distribution is a histogram (rows per length): O(longest row) memory whatever the row count, and
it gives exact quantiles and, through its CDF, the exact expected width of a random padded batch.
Files are read one line or one record batch at a time, never whole; a bad row stops the read with
one `SpecError` naming the file and the row (1-based) so the user can find it with `sed -n Np`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, get_args

import numpy as np

from fitprobe.probe.plan import Plan, plan_equation, plan_limit
from fitprobe.probe.report import PlanFacts, TokenBudget
from fitprobe.probe.spec import Collation, DataLengths, ProbeSpec, SpecError

COLLATIONS: tuple[Collation, ...] = get_args(Collation)
QUANTILES = (0.5, 0.9, 0.99, 0.999)
# padded batches wasting this share of their tokens get the hint to pack instead
PACKING_HINT_PADDING = 0.2
# 4 Mi tokens, 32 MiB of counts: far above any trained context, so a longer row is a tokenizing bug
MAX_ROW_TOKENS = 1 << 22
PROGRESS_INTERVAL_S = 0.5
_CHUNK_ROWS = 65_536  # lengths buffered before they join the histogram

# rows read, bytes read, bytes in total (of every file the dataset spans)
ProgressFn = Callable[[int, int, int], None]


@dataclass(frozen=True)
class LengthProfile:
    """The token-length distribution of a dataset; `histogram[n]` is the number of rows of n tokens."""

    rows: int
    total_tokens: int
    min_tokens: int
    max_tokens: int
    mean_tokens: float
    quantiles: tuple[tuple[float, int], ...]  # (q, the smallest length that q of the rows do not exceed)
    histogram: np.ndarray = field(compare=False, repr=False)

    def quantile(self, q: float) -> int:
        """numpy's `inverted_cdf` quantile: an actual row length, as a user would quote it."""
        return _quantile(self.histogram, q)


@dataclass(frozen=True)
class WorstBatch:
    """The largest input_ids a collation builds from b rows of this data.

    `sequence_lengths` are the sequences the batch holds (position ids restart at each); padded and
    flattened batches hold the b longest rows cut at seq_len, packed ones b rows of seq_len tokens.
    """

    collation: Collation
    shape: tuple[int, int]  # (rows, tokens per row) of input_ids
    sequence_lengths: tuple[int, ...]


class _Progress:
    """Calls the user's callback at most every PROGRESS_INTERVAL_S, and once more at the end."""

    def __init__(self, callback: ProgressFn | None, total_bytes: int) -> None:
        self.callback, self.total_bytes, self.last_s = callback, total_bytes, time.monotonic()

    def __call__(self, rows: int, bytes_read: int, final: bool = False) -> None:
        now = time.monotonic()
        if self.callback is not None and (final or now - self.last_s >= PROGRESS_INTERVAL_S):
            self.last_s = now
            self.callback(rows, min(bytes_read, self.total_bytes), self.total_bytes)


def read_profile(path: str | os.PathLike[str], progress: ProgressFn | None = None) -> LengthProfile:
    """Read a .jsonl, .parquet, .txt/.lengths file or a `save_to_disk` directory into a LengthProfile."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"{path}: no such file or directory")
    if (path.is_dir() or path.suffix == ".parquet") and importlib.util.find_spec("pyarrow") is None:
        raise SpecError(f"{path}: reading Parquet or save_to_disk data needs pyarrow: pip install 'fitprobe[hf]'")
    if path.is_dir():
        chunks = _arrow_dir_lengths(path, progress)
    elif path.suffix == ".parquet":
        chunks = _parquet_lengths(path, _Progress(progress, path.stat().st_size))
    elif path.suffix in (".jsonl", ".txt", ".lengths"):
        parse = _jsonl_row if path.suffix == ".jsonl" else _text_row
        chunks = _line_lengths(path, _Progress(progress, path.stat().st_size), parse)
    else:
        raise SpecError(f"{path}: give a .jsonl, .parquet, .txt/.lengths file or a datasets save_to_disk directory")
    histogram = np.zeros(1, dtype=np.int64)
    rows = 0
    for lengths in chunks:
        too_long = np.flatnonzero(lengths > MAX_ROW_TOKENS)
        if too_long.size:
            raise _too_long(path, rows + int(too_long[0]) + 1, int(lengths[too_long[0]]))
        counts = np.bincount(lengths, minlength=histogram.size)
        counts[: histogram.size] += histogram
        histogram, rows = counts, rows + lengths.size
    if rows == 0:
        raise SpecError(f"{path}: the dataset has no rows")
    return _profile(histogram)


def data_lengths(profile: LengthProfile, source: str | None = None) -> DataLengths:
    """The profile as the spec carries it: rows per length, the bins that hold rows only."""
    lengths = np.flatnonzero(profile.histogram)
    return DataLengths(rows_by_length={int(n): int(profile.histogram[n]) for n in lengths},
                       source=source[-256:] if source else None)


def longest_rows(data: DataLengths, count: int, seq_len: int) -> tuple[int, ...]:
    """The `count` longest rows of the data, longest first, each cut at seq_len (walks length bins, not rows)."""
    if count > data.rows:
        raise SpecError(f"micro-batch {count} is larger than the dataset ({data.rows} rows): "
                        "a batch never holds more rows than the data has")
    taken: list[int] = []
    for length in sorted(data.rows_by_length, reverse=True):
        taken += [min(length, seq_len)] * min(data.rows_by_length[length], count - len(taken))
        if len(taken) == count:
            break
    return tuple(taken)


def profile_of(data: DataLengths) -> LengthProfile:
    """The spec's rows per length back as a LengthProfile (quantiles, worst batches, padding)."""
    histogram = np.zeros(max(data.rows_by_length) + 1, dtype=np.int64)
    for length, rows in data.rows_by_length.items():
        histogram[length] = rows
    return _profile(histogram)


def _too_long(path: Path, row: int, tokens: int) -> SpecError:
    return SpecError(f"{path}: row {row} has {tokens} tokens, more than {MAX_ROW_TOKENS}; "
                     "cut rows to your seq_len before profiling")


def _quantile(histogram: np.ndarray, q: float) -> int:
    """The smallest length that at least q of the rows do not exceed (numpy's `inverted_cdf`)."""
    cumulative = np.cumsum(histogram)
    return int(np.searchsorted(cumulative, max(q * cumulative[-1], 1), side="left"))


def _profile(histogram: np.ndarray) -> LengthProfile:
    nonzero = np.flatnonzero(histogram)
    histogram = histogram[: nonzero[-1] + 1]
    histogram.flags.writeable = False  # the profile is frozen; so is the array it hands out
    rows = int(histogram.sum())
    total = int(np.dot(np.arange(histogram.size, dtype=np.int64), histogram))
    quantiles = tuple((q, _quantile(histogram, q)) for q in QUANTILES)
    return LengthProfile(rows, total, int(nonzero[0]), int(nonzero[-1]), total / rows, quantiles, histogram)


def worst_batch(profile: LengthProfile, collation: Collation, micro_batch: int, seq_len: int) -> WorstBatch:
    """The widest batch of `micro_batch` rows that `collation` builds from this data, rows cut at seq_len."""
    if collation == "packed":  # packing splits rows, so any data fills any number of rows
        return WorstBatch("packed", (micro_batch, seq_len), (seq_len,) * micro_batch)
    if micro_batch > profile.rows:
        raise SpecError(f"micro-batch {micro_batch} is larger than the dataset ({profile.rows} rows): "
                        "a batch never holds more rows than the data has")
    longest = _longest(profile.histogram, micro_batch, seq_len)
    if collation == "padded":
        return WorstBatch("padded", (micro_batch, longest[0]), longest)
    if collation == "flattened":
        return WorstBatch("flattened", (1, sum(longest)), longest)
    raise SpecError(f"collation must be one of {', '.join(COLLATIONS)} (got {collation!r})")


def _longest(histogram: np.ndarray, count: int, seq_len: int) -> tuple[int, ...]:
    """The `count` longest lengths, longest first, each cut at seq_len; walks bins, not rows."""
    taken: list[int] = []
    for length in np.flatnonzero(histogram)[::-1]:
        taken += [min(int(length), seq_len)] * min(int(histogram[length]), count - len(taken))
        if len(taken) == count:
            break
    return tuple(taken)


def expected_padding_fraction(profile: LengthProfile, collation: Collation, micro_batch: int, seq_len: int) -> float:
    """The share of batch tokens that are padding, over many batches of rows drawn at random.

    Padded: a batch of b independent draws is b × max(L) wide and holds sum(L) real tokens, so over
    many batches the waste is 1 - E[L] / E[max of b], both exact from the CDF F of L = min(length,
    seq_len): E[L] = Σ_x (1 - F(x)) and E[max] = Σ_x (1 - F(x)^b). Packed rows are full but the last
    one; flattened batches hold no padding at all.
    """
    if collation == "flattened":
        return 0.0
    if collation == "packed":
        rows_needed = math.ceil(profile.total_tokens / seq_len)
        return 1 - profile.total_tokens / (rows_needed * seq_len) if rows_needed else 0.0
    if collation != "padded":
        raise SpecError(f"collation must be one of {', '.join(COLLATIONS)} (got {collation!r})")
    width = min(profile.max_tokens, seq_len)
    cdf = np.cumsum(profile.histogram[:width]) / profile.rows  # F(x) for x < width; F(width) = 1
    expected_max = float(np.sum(1 - cdf**micro_batch))
    return 1 - float(np.sum(1 - cdf)) / expected_max if expected_max else 0.0


def _line_lengths(path: Path, progress: _Progress, parse: Callable[[Path, int, bytes], int]) -> Iterator[np.ndarray]:
    """parse(path, 1-based line number, line) of each non-blank line, _CHUNK_ROWS lengths at a time."""
    buffer: list[int] = []
    bytes_read = rows = 0
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            bytes_read += len(line)
            if line.strip():
                buffer.append(parse(path, number, line))
                progress(rows + len(buffer), bytes_read)
            if len(buffer) == _CHUNK_ROWS:
                rows += len(buffer)
                yield np.array(buffer, dtype=np.int64)
                buffer = []
    yield np.array(buffer, dtype=np.int64)
    progress(rows + len(buffer), bytes_read, final=True)


def _jsonl_row(path: Path, number: int, line: bytes) -> int:
    try:
        row: Any = json.loads(line)
    except ValueError as exc:
        raise SpecError(f"{path}: row {number} is not JSON ({exc})") from None
    ids = row.get("input_ids") if isinstance(row, dict) else None
    if ids is None:
        raise SpecError(f'{path}: row {number} has no input_ids; each line must be an object like {{"input_ids": [1, 2]}}')
    if not isinstance(ids, list) or not all(type(token) is int for token in ids):
        raise SpecError(f"{path}: row {number}: input_ids must be a list of integers (got {json.dumps(ids)[:60]})")
    return len(ids)


def _text_row(path: Path, number: int, line: bytes) -> int:
    text = line.strip()
    if not text.isdigit():  # bytes: ASCII digits only, so no sign, point or exponent
        what = "a negative length" if text.startswith(b"-") and text[1:].isdigit() else "not a whole number"
        raise SpecError(f"{path}: row {number} is {what} ({text[:40].decode(errors='replace')!r}); "
                        "each line must be one row's token count, 0 or more")
    if int(text) > MAX_ROW_TOKENS:  # before numpy, whose int64 a 20-digit count overflows
        raise _too_long(path, number, int(text))
    return int(text)


def _require_input_ids(names: list[str], path: Path, first_row: int) -> None:
    if "input_ids" not in names:
        raise SpecError(f"{path}: row {first_row} has no input_ids column (columns: {', '.join(names)})")


def _column_lengths(column: Any, path: Path, first_row: int) -> np.ndarray:
    """Token counts of one pyarrow input_ids array, or a SpecError naming the first bad row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            or not pa.types.is_integer(kind.value_type):
        raise SpecError(f"{path}: row {first_row}: input_ids must be a list of integers (column type {kind})")
    lengths = pc.list_value_length(column)
    if lengths.null_count or pc.list_flatten(column).null_count:  # the slow look only when one is bad
        rows = column.to_pylist()
        index = next(i for i, ids in enumerate(rows) if ids is None or None in ids)
        what = "input_ids is missing" if rows[index] is None else "input_ids holds a null"
        raise SpecError(f"{path}: row {first_row + index}: {what}; every row needs a list of integers")
    return lengths.to_numpy().astype(np.int64)


def _parquet_lengths(path: Path, progress: _Progress) -> Iterator[np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    try:
        with pq.ParquetFile(path) as file:
            _require_input_ids(file.schema_arrow.names, path, 1)
            total_rows = max(file.metadata.num_rows, 1)
            for batch in file.iter_batches(batch_size=_CHUNK_ROWS, columns=["input_ids"]):
                yield _column_lengths(batch.column("input_ids"), path, rows + 1)
                rows += batch.num_rows
                progress(rows, progress.total_bytes * rows // total_rows)  # bytes in proportion to rows
    except (pa.ArrowException, OSError) as exc:  # a damaged file; a bad row (SpecError) passes through
        raise SpecError(f"{path}: not a readable Parquet file after row {rows} ({exc})") from None
    progress(rows, progress.total_bytes, final=True)


def _arrow_dir_lengths(path: Path, progress: ProgressFn | None) -> Iterator[np.ndarray]:
    """The arrow files `Dataset.save_to_disk` wrote, in their order, one IPC stream batch at a time."""
    import pyarrow as pa

    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise SpecError(f"{path} holds the splits {', '.join(splits)}; give one split's directory, e.g. {path / 'train'}")
    state = path / "state.json"
    names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]] if state.exists() \
        else sorted(p.name for p in path.glob("*.arrow"))
    if not names:
        raise SpecError(f"{path}: no .arrow files; give a directory written by datasets' Dataset.save_to_disk")
    sizes = [(path / name).stat().st_size for name in names]
    tracker, rows, done_bytes = _Progress(progress, sum(sizes)), 0, 0
    for name, size in zip(names, sizes, strict=True):
        try:
            with pa.OSFile(str(path / name)) as source, pa.ipc.open_stream(source) as stream:
                _require_input_ids(stream.schema.names, path / name, rows + 1)
                for batch in stream:
                    yield _column_lengths(batch.column("input_ids"), path / name, rows + 1)
                    rows += batch.num_rows
                    tracker(rows, done_bytes + source.tell())
        except (pa.ArrowException, OSError) as exc:
            raise SpecError(f"{path / name}: not a readable arrow stream after row {rows} ({exc})") from None
        done_bytes += size
    tracker(rows, done_bytes, final=True)


def micro_batch_tokens(spec: ProbeSpec, micro_batch: int) -> int | None:
    """Tokens one micro-batch of `micro_batch` rows holds with packed or flattened collation (no padding);
    None for padded batches, whose tokens depend on which rows meet."""
    if micro_batch < 1 or spec.collation == "padded":
        return None
    if spec.collation == "flattened" and spec.data is not None:
        return sum(longest_rows(spec.data, min(micro_batch, spec.data.rows), spec.seq_len))
    return micro_batch * spec.seq_len


def data_facts(spec: ProbeSpec, max_micro_batch: int, safe_micro_batch: int | None) -> dict[str, Any] | None:
    """The report's view of the user's data: its lengths, the worst batch at the max micro-batch (the shape the
    trials ran), and the padding each collation wastes at the planned micro-batch."""
    if spec.data is None:
        return None
    profile = profile_of(spec.data)
    planned = plan_limit(max_micro_batch, safe_micro_batch)  # the micro-batch the plan may use
    worst = None
    if max_micro_batch >= 1:
        batch = worst_batch(profile, spec.collation, min(max_micro_batch, profile.rows)
                            if spec.collation != "packed" else max_micro_batch, spec.seq_len)
        worst = {"micro_batch": max_micro_batch, "shape": list(batch.shape),
                 "longest_row": max(batch.sequence_lengths), "tokens": sum(batch.sequence_lengths)}
    padding = None
    if planned >= 1:
        padding = {c: round(expected_padding_fraction(profile, c, min(planned, profile.rows), spec.seq_len), 4)
                   for c in COLLATIONS}
    over = int(profile.histogram[spec.seq_len + 1:].sum())
    return {"source": spec.data.source, "rows": profile.rows, "total_tokens": profile.total_tokens,
            "min_tokens": profile.min_tokens, "max_tokens": profile.max_tokens,
            "mean_tokens": round(profile.mean_tokens, 2),
            "quantiles": {f"p{round(q * 1000) / 10:g}": n for q, n in profile.quantiles},
            "rows_longer_than_seq_len": over, "worst_batch": worst,
            "padding_fraction_at_micro_batch": planned if planned >= 1 else None,
            "padding_fraction": padding}


def plan_facts(plan: Plan, spec: ProbeSpec) -> PlanFacts:
    """The plan as the report holds it; a token budget adds its arithmetic in tokens (rows of seq_len).

    Here beside `data_facts` because the user's data adds its share: the padding a padded batch wastes at the
    planned micro-batch. The job and the service (a cached probe planned again for another batch) both ask it."""
    planned = plan.facts()
    if spec.data is not None and spec.collation == "padded":
        profile = profile_of(spec.data)
        planned.padding_fraction = round(expected_padding_fraction(
            profile, "padded", min(plan.split.micro_batch, profile.rows), spec.seq_len), 4)
    if spec.effective_batch_tokens is not None:  # planned in rows of seq_len tokens, which packing fills
        rows = plan.split.effective_batch
        planned.tokens = TokenBudget(
            effective_batch_tokens=rows * spec.seq_len, effective_batch_tokens_asked=spec.effective_batch_tokens,
            tokens_per_row=spec.seq_len, tokens_per_micro_batch=plan.split.micro_batch * spec.seq_len,
            equation=plan_equation(plan.split, spec.seq_len))
    return planned


def data_words(data: dict[str, Any], seq_len: int, collation: str) -> list[str]:
    """The report's data section as the lines a terminal shows: what `--json` has, said so a person acts on it.

    Rows longer than seq_len are cut in every batch, so the count is said, with the seq_len that keeps the
    99th percentile whole; the padding each collation wastes is said per collation, with packing as the
    hint when padded batches waste a large share."""
    quantiles = data["quantiles"]
    lines = [f"data: {data['source'] or 'your data'}: {data['rows']} rows, {data['min_tokens']} to {data['max_tokens']} "
             f"tokens (median {quantiles.get('p50')}, p99 {quantiles.get('p99')})"]
    over = data["rows_longer_than_seq_len"]
    if over:
        lines.append(f"  {over} row{'s' if over > 1 else ''} longer than seq_len {seq_len}, cut at {seq_len} tokens")
    padding = data.get("padding_fraction")
    if padding:
        shares = ", ".join(f"{name} {share:.1%}" for name, share in padding.items())
        lines.append(f"  padding wasted at micro-batch {data['padding_fraction_at_micro_batch']}: {shares}")
    hints = []
    p99 = quantiles.get("p99")
    if over and p99 is not None and p99 > seq_len:
        hints.append(f"--seq-len {p99} keeps 99% of rows whole")
    if collation == "padded" and padding and padding.get("padded", 0) >= PACKING_HINT_PADDING:
        hints.append(f"pack instead of pad (--collation packed): padded batches waste {padding['padded']:.0%} "
                     f"of their tokens, packed ones {padding.get('packed', 0):.0%}")
    if hints:
        lines.append("  hint: " + "; ".join(hints))
    return lines


def padded_width_ratio(spec: ProbeSpec) -> Callable[[int], float] | None:
    """b ↦ the expected width of a padded batch of b random rows of the data over the trials' width (its
    longest row, cut at seq_len): the share of a worst-case micro-step's per-example work a real one does.
    None unless the batches are padded and the data is known.

    A plan asks this for every micro-batch up to 65,536, several times each (the service plans cached probes
    on the request thread), so each b is computed once, over the data's distinct lengths rather than every
    width: F is a step function, flat between them. Terms whose F^b underflows to 0 are a prefix (F rises)
    and add their widths whole, so a large b reads only the few lengths near the longest.
    """
    if spec.data is None or spec.collation != "padded":
        return None
    # rows cut at seq_len, so the histogram never outgrows seq_len
    width = min(max(spec.data.rows_by_length), spec.seq_len)
    if width < 1:  # rows of no tokens: nothing to pad
        return None
    counts: dict[int, int] = {}
    for length, rows in spec.data.rows_by_length.items():
        counts[min(length, width)] = counts.get(min(length, width), 0) + rows
    starts = np.array(sorted(length for length in counts if length < width), dtype=np.int64)
    # E[max of b] = Σ_{x < width} (1 - F(x)^b), F(x) the share of rows ≤ x: F is 0 below the shortest length
    # and F(starts[k]) from starts[k] up to the next length (or width)
    below = np.cumsum([counts[int(length)] for length in starts], dtype=np.int64) / spec.data.rows
    spans = np.diff(np.append(starts, width)).astype(np.float64)
    head = float(starts[0]) if len(starts) else float(width)  # the widths where F is 0: always 1 - 0^b
    with np.errstate(divide="ignore"):
        log_below = np.log(below)  # ascending; -inf where F is 0
    whole = np.concatenate(([0.0], np.cumsum(spans)))
    smallest_log = math.log(np.finfo(np.float64).tiny)

    @cache
    def ratio(b: int) -> float:
        b = max(b, 1)
        vanished = int(np.searchsorted(log_below, smallest_log / b, side="right"))  # F^b below the smallest float
        rest = float(np.dot(spans[vanished:], 1 - below[vanished:] ** b))
        return (head + whole[vanished] + rest) / width

    return ratio


def read_rows(path: str | os.PathLike[str], count: int) -> list[list[int]] | None:
    """The first `count` rows' token ids (fewer if the data has fewer): the verification trains on them, so
    the gradient noise scale is measured on the user's tokens. None for a lengths file, which has no tokens.

    Reads only as far as `count` rows: one line, or one record batch, at a time.
    """
    path = Path(path)
    if path.suffix in (".txt", ".lengths"):
        return None
    rows: list[list[int]] = []
    if path.suffix == ".jsonl":
        with path.open("rb") as file:
            for number, line in enumerate(file, start=1):
                if len(rows) == count:
                    break
                if line.strip():
                    _jsonl_row(path, number, line)  # the same checks and messages as the profile's read
                    rows.append(json.loads(line)["input_ids"])
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as file:
            for batch in file.iter_batches(batch_size=min(count, _CHUNK_ROWS), columns=["input_ids"]):
                rows += batch.column("input_ids").to_pylist()[: count - len(rows)]
                if len(rows) == count:
                    break
        return rows
    import datasets

    table = datasets.load_from_disk(str(path))  # memory-mapped: only the rows taken are read
    return [list(ids) for ids in table.select(range(min(count, len(table))))["input_ids"]]
