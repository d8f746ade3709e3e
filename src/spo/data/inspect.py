"""What a Pick-a-Pic-schema set holds (`spo data inspect`), read as the trainers stream it: the index of its small
columns for the counts and captions, and the image headers of a seeded sample of rows (their units only) for
sizes and formats; no image is decoded but the few a preview shows."""

from __future__ import annotations

import io
import os
from collections import Counter
from typing import Iterable

import numpy as np

from spo.data.pickapic import REASON_BAD_IMAGE, BadRow, PreferencePair
from spo.data.stream import DEFAULT_BUFFER_MB, PairIndex, UnitReader, build_index


def spread(values) -> dict:
    """min / median / mean / max of some numbers (None for none)."""
    v = np.asarray(list(values), dtype=np.float64)
    if not len(v):
        return {"min": None, "median": None, "mean": None, "max": None}
    return {"min": float(v.min()), "median": float(np.median(v)), "mean": round(float(v.mean()), 2),
            "max": float(v.max())}


def sample_rows(index: PairIndex, n: int, seed: int) -> np.ndarray:
    """Up to n rows, seeded, from as few units as give them (whole units are read): units drawn at random."""
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for u in rng.permutation(len(index.units)):
        rows = np.flatnonzero(index.unit == u)
        picked += list(rng.permutation(rows)[: n - len(picked)])
        if len(picked) >= n:
            break
    return np.sort(np.array(picked, dtype=np.int64))


def image_header(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) from an image's header (PIL reads no pixels for this), or None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format or "?", im.size[0], im.size[1]
    except Exception:  # noqa: BLE001 - PIL raises many types for bad data
        return None


def inspect_pairs(paths: str | os.PathLike | Iterable, sample: int = 64, seed: int = 0,
                  buffer_bytes: int = DEFAULT_BUFFER_MB << 20) -> tuple[dict, list[PreferencePair]]:
    """The summary of a set, and the sampled pairs (for a preview)."""
    index = build_index(paths, buffer_bytes=buffer_bytes)
    reader, sizes, formats, pairs, bad = UnitReader(), [], Counter(), [], Counter()
    for row, item in sorted(reader.read(index, sample_rows(index, sample, seed)).items()):
        if isinstance(item, BadRow):
            bad[item.reason] += 1
            continue
        heads = [image_header(item.image_0), image_header(item.image_1)]
        if None in heads:
            bad[REASON_BAD_IMAGE] += 1
            continue
        pairs.append(item)
        formats.update(h[0] for h in heads)
        sizes += [h[1:] for h in heads]
    s = index.summary
    result = {"files": s.files, "units": len(index.units), "image_bytes": index.image_bytes, "rows": s.rows_read,
              "pairs_kept": s.pairs_kept, "ties": s.ties, "skipped": dict(s.skipped), "rows_skipped": s.rows_skipped,
              "images_checked": index.images_checked, "captions_unique": len(index.captions),
              "caption_chars": spread(len(index.caption(i)) for i in range(len(index))),
              "caption_words": spread(len(index.caption(i).split()) for i in range(len(index))),
              "sample": {"rows": len(pairs) + sum(bad.values()), "unusable": dict(bad), "formats": dict(formats),
                         "width": spread(w for w, _ in sizes), "height": spread(h for _, h in sizes)},
              "would_filter": index.flagged(), "text": s.describe()}
    return result, pairs


def format_summary(result: dict) -> str:
    s, cw = result["sample"], result["caption_words"]
    lines = [result["text"],
             f"{result['units']} row groups, {result['image_bytes'] / 2**20:.1f} MiB of images; "
             f"{result['captions_unique']} distinct captions, words per caption min {cw['min']} median {cw['median']} "
             f"mean {cw['mean']} max {cw['max']}",
             "images " + ("checked in full" if result["images_checked"] else "not all checked (checked when read)"),
             f"sample of {s['rows']} rows: formats {s['formats'] or 'none'}, width {s['width']['min']}-"
             f"{s['width']['max']} (median {s['width']['median']}), height {s['height']['min']}-{s['height']['max']}"
             + (f", unusable {s['unusable']}" if s["unusable"] else ""),
             "the paper's filters would leave out: " + ", ".join(f"{n} {k}" for k, n in result["would_filter"].items())]
    return "\n".join(lines)
