"""Pick-a-Pic-schema pairs of any size: an index of the small columns, a seeded block-shuffled order, and images
read row group by row group, so memory is bounded by a buffer, not by the dataset.

The index pass reads only the caption, labels and id columns (never the images): per usable row its unit (a
parquet row group or an Arrow record batch), its row in the unit, its labels and its caption. Rows with an
empty caption or bad labels are skipped and counted there; rows left out on request (ties, are_different
false, has_label false) are counted as filtered. An image is only checked when its row is read for use (a
missing or undecodable one is then skipped and counted), except when every image fits the buffer: then the
index pass checks them all, so the kept rows are exactly spo.data.pickapic.read_pairs'.

The order of epoch e is a pure function of (seed, e). When every image fits the buffer it is
numpy.random.default_rng([seed, e]).permutation(n), the in-memory trainer's order, so a small set trains to the
same weights either way. Otherwise the units are permuted, cut into consecutive windows of at most the buffer's
bytes, and the rows of each window permuted: a reader then holds one window (two where a batch straddles them)
and reads each unit once per epoch.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from spo.data.pickapic import (LABEL_TOLERANCE, OPTIONAL_COLUMNS, REQUIRED_COLUMNS, BadRow, PreferencePair,
                               ReadSummary, check_columns, check_text, make_pair, resolve_files)
from spo.errors import SpoInputError

IMAGE_COLUMNS = ("jpg_0", "jpg_1")
SMALL_COLUMNS = tuple(c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c not in IMAGE_COLUMNS)
DEFAULT_BUFFER_MB = 512

# Reasons a good row is left out on request (keys of ReadSummary.filtered).
FILTER_TIE = "ties"
FILTER_SAME = "are_different=False"
FILTER_UNLABELLED = "has_label=False"
FLAG_BITS = {FILTER_TIE: 1, FILTER_SAME: 2, FILTER_UNLABELLED: 4}


@dataclass(frozen=True)
class Filters:
    """The paper's data filters, each off by default: ties, pairs of identical images, unlabelled pairs."""

    drop_ties: bool = False
    drop_same: bool = False
    drop_unlabelled: bool = False

    def reason(self, values: dict[str, Any], labels: list[float]) -> str | None:
        """Why these filters leave a row out (the first that applies), or None."""
        on = {FILTER_TIE: self.drop_ties, FILTER_SAME: self.drop_same, FILTER_UNLABELLED: self.drop_unlabelled}
        return next((why for why in applicable(values, labels) if on[why]), None)


def applicable(values: dict[str, Any], labels: list[float]) -> list[str]:
    """Every filter that would leave this row out."""
    return [why for why, hit in ((FILTER_TIE, abs(labels[0] - labels[1]) <= LABEL_TOLERANCE),
                                 (FILTER_SAME, values.get("are_different") is False),
                                 (FILTER_UNLABELLED, values.get("has_label") is False)) if hit]


@dataclass(frozen=True)
class Unit:
    """What is read at once: one parquet row group or one Arrow record batch."""

    file: str
    kind: str  # "parquet" or "arrow"
    group: int
    first_row: int  # row of the file where the unit starts
    nbytes: int  # image bytes


@dataclass
class PairIndex:
    """Usable rows in file order (arrays, one entry per row) and the units they sit in."""

    units: list[Unit]
    unit: np.ndarray  # int32: index into units
    row: np.ndarray  # int32: row within its unit
    label_0: np.ndarray
    label_1: np.ndarray
    caption_id: np.ndarray  # int32: index into captions
    captions: list[str]
    summary: ReadSummary
    images_checked: bool = False  # True: the index pass checked every image (the set fits the buffer)
    flags: np.ndarray | None = None  # uint8 bits per row: which filters would leave it out (FLAG_BITS)

    def __len__(self) -> int:
        return len(self.unit)

    @property
    def image_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    def caption(self, i: int) -> str:
        return self.captions[self.caption_id[i]]

    def weights(self) -> np.ndarray:
        """1 / count(caption) per row (spo.data.pickapic.examples_per_prompt's weights)."""
        counts = np.bincount(self.caption_id, minlength=len(self.captions))
        return 1.0 / counts[self.caption_id]

    def flagged(self) -> dict[str, int]:
        """How many rows each filter would leave out."""
        flags = np.zeros(len(self), dtype=np.uint8) if self.flags is None else self.flags
        return {why: int(((flags & bit) > 0).sum()) for why, bit in FLAG_BITS.items()}

    def ties(self) -> np.ndarray:
        return np.abs(self.label_0 - self.label_1) <= LABEL_TOLERANCE

    def subset(self, keep: np.ndarray) -> "PairIndex":
        """The index of the rows where `keep` is true (a bool mask), in the same order."""
        return PairIndex(self.units, self.unit[keep], self.row[keep], self.label_0[keep], self.label_1[keep],
                         self.caption_id[keep], self.captions, self.summary, self.images_checked,
                         None if self.flags is None else self.flags[keep])


# ----------------------------------------------------------------------------------------------- the index
def build_index(paths: str | os.PathLike | Iterable[str | os.PathLike], filters: Filters = Filters(),
                buffer_bytes: int = DEFAULT_BUFFER_MB << 20) -> PairIndex:
    """The index of a set (files, folders of shards, save_to_disk folders), reading only its small columns."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = resolve_files(list(paths))
    summary = ReadSummary(files=[str(f) for f, _ in files])
    units: list[Unit] = []
    parts: list[tuple] = []  # per unit: (unit, rows, label_0, label_1, captions, flags) of its kept rows
    for file, kind in files:
        for unit, table in _small_units(file, kind):
            parts.append(_index_unit(unit, len(units), table, filters, summary))
            units.append(unit)
    # Captions as ids into one list of distinct captions (pyarrow's dictionary encoding: first-seen order).
    encoded = pa.chunked_array([p[4] for p in parts], type=pa.string()).combine_chunks().dictionary_encode()
    index = PairIndex(units, *(np.concatenate([p[k] for p in parts] or [np.zeros(0, t)]).astype(t)
                               for k, t in ((0, np.int32), (1, np.int32), (2, np.float64), (3, np.float64))),
                      encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32),
                      encoded.dictionary.to_pylist(), summary,
                      flags=np.concatenate([p[5] for p in parts] or [np.zeros(0, np.uint8)]).astype(np.uint8))
    if index.image_bytes <= buffer_bytes:
        index = check_all_images(index)
    _count_kept(index)
    return index


def _index_unit(unit: Unit, unit_id: int, table: pa.Table, filters: Filters, summary: ReadSummary) -> tuple:
    """The kept rows of one unit (column arrays); bad rows skipped and counted, filtered ones counted.

    Vectorised: a row the array checks doubt is judged by check_text itself (rows in order, so the examples
    are read_pairs'); one they pass passes check_text too (the caption is checked in Python, as there).
    """
    n = table.num_rows
    summary.rows_read += n
    captions = table.column("caption").to_pylist()
    good = np.array([isinstance(c, str) and bool(c.strip()) for c in captions], dtype=bool)
    l0, l1 = (_numbers(table.column(name)) for name in ("label_0", "label_1"))
    with np.errstate(invalid="ignore"):
        good &= np.isfinite(l0) & np.isfinite(l1) & (l0 >= 0) & (l0 <= 1) & (l1 >= 0) & (l1 <= 1)
        good &= np.abs(l0 + l1 - 1.0) <= LABEL_TOLERANCE
    for i in np.flatnonzero(~good):
        text = check_text(unit.file, unit.first_row + int(i), table.slice(int(i), 1).to_pylist()[0])
        if isinstance(text, BadRow):
            _skip(summary, text)
        else:  # e.g. a label column of a type the arrays do not read: check_text's word is final
            good[i], (l0[i], l1[i]) = True, text[1]
    flags = _flag_bits(table, l0, l1)
    on = sum(FLAG_BITS[w] for w, o in ((FILTER_TIE, filters.drop_ties), (FILTER_SAME, filters.drop_same),
                                       (FILTER_UNLABELLED, filters.drop_unlabelled)) if o)
    for why, bit in FLAG_BITS.items():  # a row left out is counted once, under the first filter that applies
        first = good & ((flags & on & bit) > 0) & ((flags & on & (bit - 1)) == 0)
        if first.any():
            summary.filtered[why] += int(first.sum())
    keep = np.flatnonzero(good & ((flags & on) == 0))
    return (np.full(len(keep), unit_id), keep, l0[keep], l1[keep],
            pa.array([captions[i] for i in keep], type=pa.string()), flags[keep])


def _numbers(column: pa.ChunkedArray) -> np.ndarray:
    """A label column as float64 (nulls and non-numbers as NaN, judged by check_text)."""
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        return np.full(len(column), np.nan)
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _flag_bits(table: pa.Table, l0: np.ndarray, l1: np.ndarray) -> np.ndarray:
    """FLAG_BITS of every row: a tie, are_different false, has_label false (a null is no false)."""
    flags = np.where(np.abs(l0 - l1) <= LABEL_TOLERANCE, FLAG_BITS[FILTER_TIE], 0).astype(np.uint8)
    for name, why in (("are_different", FILTER_SAME), ("has_label", FILTER_UNLABELLED)):
        if name in table.column_names and pa.types.is_boolean(table.column(name).type):
            false = pa.compute.fill_null(pa.compute.invert(table.column(name)), False)
            flags |= np.where(false.to_numpy(zero_copy_only=False), FLAG_BITS[why], 0).astype(np.uint8)
    return flags


def _skip(summary: ReadSummary, bad: BadRow) -> None:
    summary.skipped[bad.reason] += 1
    if len(summary.bad_rows) < 100:  # examples for the message; the counts are complete
        summary.bad_rows.append(bad)


def _count_kept(index: PairIndex) -> None:
    index.summary.pairs_kept = len(index)
    index.summary.ties = int(index.ties().sum())


def check_all_images(index: PairIndex) -> PairIndex:
    """Drop (and count) the rows whose images are missing or undecodable, reading unit by unit."""
    keep = np.ones(len(index), dtype=bool)
    reader = UnitReader()
    for u, rows in _rows_by_unit(index, np.arange(len(index))):
        for i, item in zip(rows, reader.pairs(index, index.units[u], index.row[rows], rows)):
            if isinstance(item, BadRow):
                keep[i] = False
                _skip(index.summary, item)
    order = {f: i for i, f in enumerate(index.summary.files)}
    index.summary.bad_rows.sort(key=lambda b: (order.get(b.file, 0), b.row))  # in file order, as read_pairs lists them
    checked = index.subset(keep)
    checked.images_checked = True
    return checked


def _rows_by_unit(index: PairIndex, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(unit, the given rows in it, in file order) for each unit the rows touch, in file order."""
    rows = np.sort(rows)
    units = index.unit[rows]  # non-decreasing: rows are in file order
    for part in np.split(rows, np.flatnonzero(np.diff(units)) + 1) if len(rows) else []:
        yield int(index.unit[part[0]]), part


def _small_units(file: Path, kind: str) -> Iterator[tuple[Unit, pa.Table]]:
    """Each unit of a file with its small columns (the images are not read; their size is the metadata's)."""
    try:
        if kind == "parquet":
            yield from _parquet_units(file)
        else:
            yield from _arrow_units(file)
    except SpoInputError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise SpoInputError(f"cannot read {file} as {kind}: {exc}") from None


def _parquet_units(file: Path) -> Iterator[tuple[Unit, pa.Table]]:
    pf = pq.ParquetFile(file)
    check_columns(file, pf.schema_arrow)
    small = [c for c in SMALL_COLUMNS if c in pf.schema_arrow.names]
    first = 0
    for g in range(pf.num_row_groups):
        meta = pf.metadata.row_group(g)
        nbytes = sum(_column_bytes(meta, name) for name in IMAGE_COLUMNS)
        table = pf.read_row_group(g, columns=small, use_threads=False)
        yield Unit(str(file), "parquet", g, first, nbytes), table
        first += meta.num_rows


def _column_bytes(meta, name: str) -> int:
    """Uncompressed bytes of a column of a row group (a struct column's leaves summed)."""
    return sum(meta.column(i).total_uncompressed_size for i in range(meta.num_columns)
               if meta.column(i).path_in_schema.split(".")[0] == name)


def _arrow_units(file: Path) -> Iterator[tuple[Unit, pa.Table]]:
    first = 0
    for g, batch in enumerate(_arrow_batches(file)):
        nbytes = sum(batch.column(name).nbytes for name in IMAGE_COLUMNS)  # memory-mapped: nothing is copied
        small = [c for c in SMALL_COLUMNS if c in batch.schema.names]
        yield Unit(str(file), "arrow", g, first, nbytes), pa.Table.from_batches([batch.select(small)])
        first += batch.num_rows


def _arrow_batches(file: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow IPC stream or file (save_to_disk writes streams), memory-mapped."""
    source = pa.memory_map(str(file))
    try:
        reader = ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = ipc.open_file(pa.memory_map(str(file)))
        check_columns(file, reader.schema)
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        return
    check_columns(file, reader.schema)
    yield from reader


# ----------------------------------------------------------------------------------------------- the order
@dataclass
class BlockOrder:
    """The seeded per-epoch order of an index's rows (see the module docstring), and its windows."""

    index: PairIndex
    seed: int
    buffer_bytes: int = DEFAULT_BUFFER_MB << 20
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.index)

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows in order, start offset of each window plus the end) of epoch e; the last two epochs cached."""
        if e not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[e] = block_order(self.index, self.seed, e, self.buffer_bytes)
        return self._cache[e]

    def rows(self, start: int, count: int) -> np.ndarray:
        """Rows at positions start..start+count-1 of the endless stream of epochs."""
        pos = np.arange(start, start + count, dtype=np.int64)
        return np.array([self.epoch(int(e))[0][o] for e, o in zip(*np.divmod(pos, self.n))], dtype=np.int64)

    def window_of(self, position: int) -> tuple[int, int]:
        """(epoch, window) holding a position of the stream."""
        e, o = divmod(int(position), self.n)
        return e, int(np.searchsorted(self.epoch(e)[1], o, side="right") - 1)


def block_order(index: PairIndex, seed: int, epoch: int, buffer_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, epoch])
    n = len(index)
    if index.image_bytes <= buffer_bytes:  # all in one window: the in-memory order, by construction
        return rng.permutation(n), np.array([0, n])
    starts = np.searchsorted(index.unit, np.arange(len(index.units) + 1))  # rows of unit u: starts[u]:starts[u+1]
    used = np.flatnonzero(np.diff(starts))
    order, bounds, window, held = [], [0], [], 0
    for u in rng.permutation(used):
        size = index.units[u].nbytes
        if window and held + size > buffer_bytes:
            order.append(_shuffle_window(rng, window, starts))
            bounds.append(bounds[-1] + len(order[-1]))
            window, held = [], 0
        window.append(u)
        held += size
    order.append(_shuffle_window(rng, window, starts))
    bounds.append(bounds[-1] + len(order[-1]))
    return np.concatenate(order), np.array(bounds)


def _shuffle_window(rng, units: list[int], starts: np.ndarray) -> np.ndarray:
    rows = np.concatenate([np.arange(starts[u], starts[u + 1]) for u in units])
    return rows[rng.permutation(len(rows))]


# ----------------------------------------------------------------------------------------------- reading
class UnitReader:
    """Reads whole units (row groups, record batches) and gives back the rows asked for; open files are kept.

    Open files are not pickled: a DataLoader worker opens its own.
    """

    def __init__(self) -> None:
        self._files: dict[str, pq.ParquetFile] = {}

    def __getstate__(self) -> dict:
        return {"_files": {}}

    def rows(self, unit: Unit, rows: np.ndarray) -> list[dict[str, Any]]:
        """The column values of `rows` of a unit. Scalar by scalar: only the rows asked for are copied out
        (Table.take would copy every image of them first, ~40x slower here)."""
        try:
            if unit.kind == "parquet":
                pf = self._files.get(unit.file)
                if pf is None:
                    pf = self._files[unit.file] = pq.ParquetFile(unit.file)
                    if len(self._files) > 8:
                        self._files.pop(next(iter(self._files)))
                wanted = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in pf.schema_arrow.names]
                # one thread: arrow's pool costs more than it gains on one row group (13x here, 2 cores)
                table = pf.read_row_group(unit.group, columns=wanted, use_threads=False)
            else:
                batch = next(b for g, b in enumerate(_arrow_batches(Path(unit.file))) if g == unit.group)
                table = pa.Table.from_batches([batch])
            cols = {name: table.column(name).combine_chunks() for name in table.column_names}
            return [{name: col[int(r)].as_py() for name, col in cols.items()} for r in rows]
        except (pa.ArrowException, OSError, StopIteration) as exc:
            raise SpoInputError(f"cannot read {unit.file} at row {unit.first_row} (row group {unit.group}): "
                                f"{exc or 'it changed since it was indexed'}") from None

    def pairs(self, index: PairIndex, unit: Unit, rows: np.ndarray, ids: np.ndarray) -> list[PreferencePair | BadRow]:
        """The pairs at `rows` of `unit` (each checked as read_pairs does), with the index's labels."""
        out = []
        for r, i, values in zip(rows, ids, self.rows(unit, rows)):
            pair = make_pair(Path(unit.file), unit.first_row + int(r), values)
            if isinstance(pair, PreferencePair):
                pair.label_0, pair.label_1 = float(index.label_0[i]), float(index.label_1[i])
            out.append(pair)
        return out

    def read(self, index: PairIndex, rows: np.ndarray) -> dict[int, PreferencePair | BadRow]:
        """{row: its pair or why it is unusable} for index rows, reading each unit they touch once."""
        out: dict[int, PreferencePair | BadRow] = {}
        for u, in_unit in _rows_by_unit(index, np.unique(rows)):
            for i, item in zip(in_unit, self.pairs(index, index.units[u], index.row[in_unit], in_unit)):
                out[int(i)] = item
        return out


def iter_pairs(index: PairIndex, rows: np.ndarray | None = None, *, summary: ReadSummary | None = None,
               reader: UnitReader | None = None) -> Iterator[tuple[int, PreferencePair]]:
    """(row, pair) of the given index rows (default all) in file order, one unit in memory at a time; unusable
    rows are counted in `summary` (default the index's) and left out."""
    reader = reader or UnitReader()
    summary = summary if summary is not None else index.summary
    rows = np.arange(len(index)) if rows is None else np.asarray(rows)
    for u, in_unit in _rows_by_unit(index, rows):
        for i, item in zip(in_unit, reader.pairs(index, index.units[u], index.row[in_unit], in_unit)):
            if isinstance(item, BadRow):
                _skip(summary, item)
            else:
                yield int(i), item


def skipped_text(counts: Counter) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def buffer_bytes(cfg) -> int:
    """The shuffle buffer a config (spo.train.config.PairsConfig) asks for, in bytes."""
    return int(cfg.shuffle_buffer_mb * 2**20)


def filters_of(cfg) -> Filters:
    """The filters a config (spo.train.config.PairsConfig) asks for."""
    return Filters(cfg.drop_ties, cfg.drop_same, cfg.drop_unlabelled)


def filter_pairs(pairs: list[PreferencePair], filters: Filters, summary: ReadSummary) -> list[PreferencePair]:
    """The in-memory pairs the filters keep; those left out are counted in `summary`."""
    kept = []
    for p in pairs:
        why = filters.reason(p.ids, [p.label_0, p.label_1])
        if why:
            summary.filtered[why] += 1
        else:
            kept.append(p)
    summary.pairs_kept, summary.ties = len(kept), sum(p.is_tie for p in kept)
    return kept
