"""Reader and writer of the Pick-a-Pic v1 preference-pair schema (parquet or Arrow IPC stream).

Columns: ``caption`` (str), ``jpg_0`` / ``jpg_1`` (encoded image bytes), ``label_0`` / ``label_1``
(floats summing to 1; 0.5/0.5 is a tie), and optional ids ``are_different``, ``image_0_uid``,
``image_1_uid``, ``user_id``, ``ranking_id`` (and Pick-a-Pic v2's ``has_label``, ``best_image_uid``, ``model_0``,
``model_1``). This module reads a set into memory; spo.data.stream reads one of any size row group by row group.

Inputs may be parquet files, directories (every ``*.parquet`` below them, sorted), or a folder
written by ``datasets.Dataset.save_to_disk`` (``dataset_info.json``/``state.json`` beside
``*.arrow`` files in Arrow IPC stream format; read with pyarrow alone).

A file without the required columns is always an error. A bad row (missing or undecodable image,
labels outside [0, 1] or not summing to 1, empty caption) is skipped and counted when
``skip_bad=True`` and raises `SpoInputError` naming file, row and problem otherwise. A label is
never guessed or repaired.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from spo.errors import SpoInputError
from spo.io import atomic_path

REQUIRED_COLUMNS: tuple[str, ...] = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
OPTIONAL_COLUMNS: tuple[str, ...] = ("are_different", "image_0_uid", "image_1_uid", "user_id", "ranking_id",
                                     "has_label", "best_image_uid", "model_0", "model_1")  # the last four: v2
LABEL_TOLERANCE = 1e-3
_BATCH_ROWS = 256

_OPTIONAL_TYPES: dict[str, pa.DataType] = {
    "are_different": pa.bool_(),
    "image_0_uid": pa.string(),
    "image_1_uid": pa.string(),
    "user_id": pa.int64(),
    "ranking_id": pa.int64(),
    "has_label": pa.bool_(),
    "best_image_uid": pa.string(),
    "model_0": pa.string(),
    "model_1": pa.string(),
}
_REQUIRED_TYPES: dict[str, pa.DataType] = {
    "caption": pa.string(),
    "jpg_0": pa.binary(),
    "jpg_1": pa.binary(),
    "label_0": pa.float64(),
    "label_1": pa.float64(),
}

# Reasons a row is skipped (keys of ReadSummary.skipped).
REASON_MISSING_IMAGE = "missing image"
REASON_BAD_IMAGE = "undecodable image"
REASON_BAD_LABELS = "bad labels"
REASON_EMPTY_CAPTION = "empty caption"


@dataclass
class PreferencePair:
    """One human preference between two images for a caption. ``row`` is 0-based within ``source``."""

    caption: str
    image_0: bytes
    image_1: bytes
    label_0: float
    label_1: float
    source: str
    row: int
    ids: dict[str, Any] = field(default_factory=dict)

    @property
    def is_tie(self) -> bool:
        return abs(self.label_0 - self.label_1) <= LABEL_TOLERANCE

    @property
    def preferred(self) -> int | None:
        """0 or 1 for the preferred image, None for a tie."""
        if self.is_tie:
            return None
        return 0 if self.label_0 > self.label_1 else 1

    def decode(self):
        """Both images as PIL RGB images."""
        return _decode_rgb(self.image_0, self.source, self.row, "jpg_0"), _decode_rgb(
            self.image_1, self.source, self.row, "jpg_1"
        )

    def to_row(self) -> dict[str, Any]:
        row = {
            "caption": self.caption,
            "jpg_0": self.image_0,
            "jpg_1": self.image_1,
            "label_0": self.label_0,
            "label_1": self.label_1,
        }
        row.update(self.ids)
        return row


@dataclass
class BadRow:
    file: str
    row: int
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.file} row {self.row}: {self.detail}"


@dataclass
class ReadSummary:
    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    pairs_kept: int = 0
    ties: int = 0
    skipped: Counter = field(default_factory=Counter)
    bad_rows: list[BadRow] = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)  # good rows left out on request (spo.data.stream's filters)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def describe(self, max_examples: int = 3) -> str:
        n_files = len(self.files)
        text = (
            f"Read {self.rows_read} row{'s' if self.rows_read != 1 else ''} from {n_files} "
            f"file{'s' if n_files != 1 else ''}; kept {self.pairs_kept} preference pair"
            f"{'s' if self.pairs_kept != 1 else ''} ({self.ties} tie{'s' if self.ties != 1 else ''})"
        )
        if self.filtered:
            text += "; left out " + ", ".join(f"{n} {why}" for why, n in sorted(self.filtered.items()))
        if not self.rows_skipped:
            return text + "; skipped none."
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])))
        examples = "; ".join(str(b) for b in self.bad_rows[:max_examples])
        more = f" (and {len(self.bad_rows) - max_examples} more)" if len(self.bad_rows) > max_examples else ""
        return f"{text}; skipped {self.rows_skipped} ({reasons}). First skipped: {examples}{more}."


# ----------------------------------------------------------------------------------------------- writing


def write_pairs(path: str | os.PathLike, pairs_rows: Sequence[dict[str, Any] | PreferencePair],
                rows_per_group: int | None = None) -> Path:
    """Write rows (dicts with the Pick-a-Pic columns, or PreferencePair) to one parquet file, atomically
    (`rows_per_group`: parquet row groups of that many rows; default one)."""
    path = Path(path)
    rows = [r.to_row() if isinstance(r, PreferencePair) else dict(r) for r in pairs_rows]
    for i, row in enumerate(rows):
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise SpoInputError(f"cannot write {path}: row {i} lacks column(s) {', '.join(missing)}")
    names: list[str] = list(REQUIRED_COLUMNS)
    for row in rows:
        for key in row:
            if key not in names:
                names.append(key)
    arrays, fields = [], []
    for name in names:
        values = [row.get(name) for row in rows]
        typ = _REQUIRED_TYPES.get(name) or _OPTIONAL_TYPES.get(name)
        try:
            arr = pa.array(values, type=typ) if typ is not None else pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise SpoInputError(f"cannot write {path}: column {name!r}: {exc}") from None
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, row_group_size=rows_per_group)
    return path


# ----------------------------------------------------------------------------------------------- reading


def read_pairs(
    paths: str | os.PathLike | Iterable[str | os.PathLike], *, skip_bad: bool = True
) -> tuple[list[PreferencePair], ReadSummary]:
    """Read preference pairs from parquet files, directories of them, or a save_to_disk folder."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = resolve_files(list(paths))
    summary = ReadSummary(files=[str(f) for f, _ in files])
    pairs: list[PreferencePair] = []
    for file, kind in files:
        for pair_or_bad in _read_file(file, kind, summary):
            if isinstance(pair_or_bad, BadRow):
                if not skip_bad:
                    raise SpoInputError(str(pair_or_bad))
                summary.skipped[pair_or_bad.reason] += 1
                summary.bad_rows.append(pair_or_bad)
            else:
                pairs.append(pair_or_bad)
                summary.pairs_kept += 1
                summary.ties += pair_or_bad.is_tie
    return pairs, summary


def examples_per_prompt(pairs: Sequence[PreferencePair]) -> list[float]:
    """Per-pair sampling weights 1/count(caption), so each caption carries equal total weight."""
    counts = Counter(p.caption for p in pairs)
    return [1.0 / counts[p.caption] for p in pairs]


def _is_arrow_dataset_dir(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_info.json").is_file()


def _arrow_files(folder: Path) -> list[Path]:
    state = folder / "state.json"
    if state.is_file():
        try:
            data_files = json.loads(state.read_text(encoding="utf-8")).get("_data_files") or []
            listed = [folder / d["filename"] for d in data_files if isinstance(d, dict) and "filename" in d]
        except (OSError, ValueError, AttributeError) as exc:
            raise SpoInputError(f"cannot read {state}: {exc}") from None
        if listed:
            for f in listed:
                if not f.is_file():
                    raise SpoInputError(f"{state} lists {f.name}, which does not exist")
            return listed
    return sorted(folder.glob("*.arrow"))


def resolve_files(paths: list[str | os.PathLike]) -> list[tuple[Path, str]]:
    if not paths:
        raise SpoInputError("no preference-pair input given")
    out: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise SpoInputError(f"preference-pair input {p} does not exist")
        if p.is_dir():
            if _is_arrow_dataset_dir(p):
                found = [(f, "arrow") for f in _arrow_files(p)]
            else:
                found = [(f, "parquet") for f in sorted(p.rglob("*.parquet")) if f.is_file()]
                _one_split(p, [f for f, _ in found])
                if not found:  # a directory of save_to_disk splits, e.g. train/ and validation/
                    found = [
                        (f, "arrow")
                        for d in sorted({q.parent for q in p.rglob("*.arrow")})
                        if _is_arrow_dataset_dir(d)
                        for f in _arrow_files(d)
                    ]
            if not found:
                raise SpoInputError(f"{p} contains no .parquet files and is not a datasets save_to_disk folder")
            out.extend(found)
        elif p.suffix == ".arrow":
            out.append((p, "arrow"))
        else:
            out.append((p, "parquet"))
    return out


def _one_split(folder: Path, files: list[Path]) -> None:
    """A hub-cache folder (data/train-00000-of-00645.parquet, data/test_unique-...) holds several splits: reading
    them all would train on the test pairs, so the user names one."""
    splits = sorted({m.group(1) for f in files if (m := re.fullmatch(r"(.+)-\d{5}-of-\d{5}\.parquet", f.name))})
    if len(splits) > 1:
        raise SpoInputError(f"{folder} holds the splits {', '.join(splits)}: name the one to read, e.g. "
                            f"{folder}/{'train' if 'train' in splits else splits[0]}-*.parquet")


def _open_batches(file: Path, kind: str) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    try:
        if kind == "parquet":
            pf = pq.ParquetFile(file)
            schema = pf.schema_arrow
            wanted = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in schema.names]
            check_columns(file, schema)
            return schema, pf.iter_batches(batch_size=_BATCH_ROWS, columns=wanted)
        try:
            reader = ipc.open_stream(pa.memory_map(str(file)))
        except pa.ArrowInvalid:
            reader = ipc.open_file(pa.memory_map(str(file)))
            check_columns(file, reader.schema)
            return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
        check_columns(file, reader.schema)
        return reader.schema, iter(reader)
    except SpoInputError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise SpoInputError(f"cannot read {file} as {kind}: {exc}") from None


def check_columns(file: Path, schema: pa.Schema) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise SpoInputError(
            f"{file} lacks required column(s) {', '.join(missing)} (has: {', '.join(schema.names) or 'none'})"
        )


def _read_file(file: Path, kind: str, summary: ReadSummary) -> Iterator[PreferencePair | BadRow]:
    _, batches = _open_batches(file, kind)
    row = 0
    try:
        for batch in batches:
            cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
            for i in range(batch.num_rows):
                summary.rows_read += 1
                yield make_pair(file, row, {name: values[i] for name, values in cols.items()})
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise SpoInputError(f"cannot read {file} at row {row}: {exc}") from None


def image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):  # datasets Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) or None
    return None


def make_pair(file: Path, row: int, values: dict[str, Any]) -> PreferencePair | BadRow:
    """The pair of one row's column values, or why the row cannot be used."""
    src = str(file)
    text = check_text(src, row, values)
    if isinstance(text, BadRow):
        return text
    caption, labels = text
    images = []
    for name in ("jpg_0", "jpg_1"):
        data = image_bytes(values.get(name))
        if data is None:
            return BadRow(src, row, REASON_MISSING_IMAGE, f"{name} is missing or empty")
        problem = verify_image(data)
        if problem:
            return BadRow(src, row, REASON_BAD_IMAGE, f"{name} is not a decodable image ({problem})")
        images.append(data)

    ids = {k: values[k] for k in OPTIONAL_COLUMNS if k in values}
    return PreferencePair(caption, images[0], images[1], labels[0], labels[1], src, row, ids)


def check_text(src: str, row: int, values: dict[str, Any]) -> tuple[str, list[float]] | BadRow:
    """(caption, [label_0, label_1]) of a row, or why they are unusable: the checks that need no image."""
    caption = values.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        return BadRow(src, row, REASON_EMPTY_CAPTION, "empty or missing caption")

    labels = []
    for name in ("label_0", "label_1"):
        v = values.get(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return BadRow(src, row, REASON_BAD_LABELS, f"{name} is {v!r}, not a number")
        if not 0.0 <= v <= 1.0:
            return BadRow(src, row, REASON_BAD_LABELS, f"{name} = {v} is outside [0, 1]")
        labels.append(float(v))
    if abs(labels[0] + labels[1] - 1.0) > LABEL_TOLERANCE:
        return BadRow(
            src, row, REASON_BAD_LABELS, f"labels {labels[0]} + {labels[1]} = {labels[0] + labels[1]} do not sum to 1"
        )
    return caption, labels


def verify_image(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types for corrupt data
        text = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))  # PIL's repr of our buffer: noise
        return f"{type(exc).__name__}: {text}".strip().rstrip(":")
    return None


def _decode_rgb(data: bytes, source: str, row: int, name: str):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise SpoInputError(f"{source} row {row}: {name} cannot be decoded ({type(exc).__name__}: {exc})") from None
