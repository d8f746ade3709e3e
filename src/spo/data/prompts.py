"""Prompt lists for sampling and training.

`load_prompts` reads a JSON list (strings, or objects with a "caption" or "prompt" key), a JSON-lines
file, a .txt file (one prompt a line), or one column of a CSV/TSV or parquet file. Every prompt goes
through `clean_prompt`; prompts left empty are dropped and counted (``result.dropped``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable

from spo.errors import SpoInputError

DEFAULT_COLUMNS: tuple[str, ...] = ("caption", "prompt")
_WS = re.compile(r"\s+")


class PromptList(list):
    """A list of prompts that also remembers where it came from and how many empty ones were dropped."""

    def __init__(self, prompts: Iterable[str] = (), *, source: str = "", dropped: int = 0):
        super().__init__(prompts)
        self.source = source
        self.dropped = dropped


def clean_prompt(p: str) -> str:
    """Remove control and format characters, collapse runs of whitespace to one space, strip the ends."""
    if not isinstance(p, str):
        raise SpoInputError(f"prompt must be a string, got {type(p).__name__}")
    chars = []
    for ch in p:
        if ch.isspace():
            chars.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co"):  # control, format (zero-width), surrogate, private
            continue
        else:
            chars.append(ch)
    return _WS.sub(" ", "".join(chars)).strip()


def load_prompts(source: str | os.PathLike, column: str | None = None) -> PromptList:
    path = Path(source)
    if not path.exists():
        raise SpoInputError(f"prompt file {path} does not exist")
    if path.is_dir():
        raise SpoInputError(f"prompt source {path} is a directory, not a file")
    ext = path.suffix.lower()
    if ext == ".json":
        raw = _from_json_values(_read_json(path), path, column)
    elif ext == ".jsonl":
        raw = _from_json_values(_read_jsonl(path), path, column)
    elif ext == ".txt":
        raw = _read_text(path).splitlines()
    elif ext in (".csv", ".tsv"):
        raw = _from_csv(path, column, delimiter="\t" if ext == ".tsv" else ",")
    elif ext == ".parquet":
        raw = _from_parquet(path, column)
    else:
        raise SpoInputError(
            f"prompt file {path} has unknown extension {ext or '(none)'!r}; use .json, .jsonl, .txt, .csv, .tsv or .parquet"
        )
    prompts, dropped = [], 0
    for value in raw:
        if value is None:
            dropped += 1
            continue
        if not isinstance(value, str):
            raise SpoInputError(f"{path}: prompt {value!r} is not a string")
        cleaned = clean_prompt(value)
        if cleaned:
            prompts.append(cleaned)
        else:
            dropped += 1
    if not prompts:
        raise SpoInputError(f"{path} contains no prompts" + (f" ({dropped} empty)" if dropped else ""))
    return PromptList(prompts, source=str(path), dropped=dropped)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpoInputError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise SpoInputError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise SpoInputError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, list):
        raise SpoInputError(f"{path} must hold a JSON list of prompts, not a {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[Any]:
    out = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SpoInputError(f"{path} line {n} is not valid JSON: {exc.msg}") from None
    return out


def _from_json_values(items: list[Any], path: Path, column: str | None) -> list[Any]:
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str) or item is None:
            out.append(item)
        elif isinstance(item, dict):
            out.append(item[_pick_key(item.keys(), column, f"{path} entry {i}")])
        else:
            raise SpoInputError(f"{path} entry {i} is a {type(item).__name__}, not a string or an object")
    return out


def _pick_key(names: Iterable[str], column: str | None, where: str) -> str:
    names = list(names)
    if column is not None:
        if column not in names:
            raise SpoInputError(f"{where} has no column {column!r} (has: {', '.join(map(str, names)) or 'none'})")
        return column
    present = [c for c in DEFAULT_COLUMNS if c in names]
    if len(present) == 1:
        return present[0]
    if len(present) > 1:
        raise SpoInputError(f"{where} has both 'caption' and 'prompt'; choose one with a column name (--prompt-column)")
    if len(names) == 1:
        return names[0]
    raise SpoInputError(
        f"{where} has no 'caption' or 'prompt' column (has: {', '.join(map(str, names)) or 'none'}); name the column (--prompt-column)"
    )


def _from_csv(path: Path, column: str | None, delimiter: str) -> list[Any]:
    text = _read_text(path)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        header = reader.fieldnames
        if not header:
            raise SpoInputError(f"{path} is empty; it needs a header row")
        key = _pick_key(header, column, str(path))
        return [row.get(key) for row in reader]
    except csv.Error as exc:
        raise SpoInputError(f"{path} is not valid CSV: {exc}") from None


def _from_parquet(path: Path, column: str | None) -> list[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        key = _pick_key(pf.schema_arrow.names, column, str(path))
        typ = pf.schema_arrow.field(key).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise SpoInputError(f"{path} column {key!r} holds {typ}, not strings")
        return pf.read(columns=[key]).column(key).to_pylist()
    except SpoInputError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise SpoInputError(f"cannot read {path} as parquet: {exc}") from None
