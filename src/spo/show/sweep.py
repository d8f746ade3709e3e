"""Side-by-side grids: any two of strength / denoise / seed / scheduler / steps / cfg / prompt as axes.

Every cell of a grid uses the same seeds and prompts as its neighbours, so two cells differ only in the
swept values. Axes not drawn but given several values become separate pages. Optionally every cell is
scored (toy judge or a scorer at t = 0) and the mean score per strength gives a suggested strength range.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from pathlib import Path

import numpy as np

from spo.errors import SpoInputError
from spo.io import check_output_dir
from spo.show.grid import MIN_CELL, labelled_grid  # noqa: F401 - MIN_CELL: part of this module's API

AXES = ("strength", "denoise", "seed", "scheduler", "steps", "cfg", "prompt")
DEFAULT_STRENGTHS = (-1.0, 0.0, 0.5, 1.0, 1.5, 2.0)


def _fmt(axis: str, value) -> str:
    from spo.show.infotext import fmt_number

    if axis in ("strength", "denoise", "cfg"):
        return f"{axis} {fmt_number(value)}"
    if axis == "prompt":
        text = str(value)
        return text if len(text) <= 48 else text[:45] + "..."
    return f"{axis} {value}"


def suggest_strengths(strengths, means, cis, alignment=None, tolerance: float | None = None,
                      alignment_drop: float = 0.05) -> dict | None:
    """Strengths whose mean score is within `tolerance` (default: the best's 95% CI half-width) of the best,
    among those whose alignment (if known) is no more than `alignment_drop` below the strength nearest 0.
    Returns the contiguous run of such strengths around the best one."""
    order = np.argsort(strengths)
    s = np.asarray(strengths, dtype=float)[order]
    m = np.asarray(means, dtype=float)[order]
    c = np.asarray(cis, dtype=float)[order]
    if len(s) < 2:
        return None
    ok_align = np.ones(len(s), dtype=bool)
    if alignment is not None:
        a = np.asarray(alignment, dtype=float)[order]
        ref = a[int(np.argmin(np.abs(s)))]
        ok_align = a >= ref - alignment_drop
    if not ok_align.any():
        return None
    best = int(np.argmax(np.where(ok_align, m, -np.inf)))
    tol = float(c[best]) if tolerance is None else float(tolerance)
    good = ok_align & (m >= m[best] - tol)
    lo = hi = best
    while lo > 0 and good[lo - 1]:
        lo -= 1
    while hi < len(s) - 1 and good[hi + 1]:
        hi += 1
    why = f"mean score within {tol:.3g} of the best"
    if alignment is not None:
        why += f" and alignment at most {alignment_drop:.0%} below strength {s[int(np.argmin(np.abs(s)))]:g}"
    return {"best": float(s[best]), "low": float(s[lo]), "high": float(s[hi]), "tolerance": tol,
            "text": f"suggested strength {s[lo]:g} to {s[hi]:g} (best {s[best]:g}; {why})"}


def plot_scores(xs, rows: dict[str, tuple[list, list]], xlabel: str, target: Path, suggestion: dict | None = None,
                alignment: list | None = None) -> None:
    """Mean score (with 95% CI bars) against the swept values; alignment on a second axis; range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spo.io import write_bytes

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    numeric = all(isinstance(x, (int, float)) for x in xs)
    pos = list(xs) if numeric else list(range(len(xs)))
    for name, (means, cis) in rows.items():
        ax.errorbar(pos, means, yerr=cis, marker="o", capsize=3, label=name)
    if suggestion is not None and numeric:
        ax.axvspan(suggestion["low"] - 0.05, suggestion["high"] + 0.05, color="tab:green", alpha=0.15,
                   label=f"suggested {suggestion['low']:g}..{suggestion['high']:g}")
    if alignment is not None:
        ax2 = ax.twinx()
        ax2.plot(pos, alignment, color="tab:gray", linestyle="--", marker="s", label="alignment")
        ax2.set_ylabel("alignment (fraction)")
        ax2.set_ylim(-0.05, 1.05)
        ax2.legend(loc="lower right", fontsize=8)
    if not numeric:
        ax.set_xticks(pos, [str(x) for x in xs], rotation=30)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean score (95% CI)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes(target, buf.getvalue())


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(v.size))


def sweep(model: str, prompts: list[str], out, *, loras=None, values: dict[str, list] | None = None,
          x: str = "strength", y: str = "seed", settings=None, init_image=None, lora_index: int = 0,
          score: str | None = None, family: str | None = None, tolerance: float | None = None,
          batch: int = 8, log=print) -> dict:
    """Generate, draw and (optionally) score the grids; returns the sweep.json content."""
    from tqdm.auto import tqdm

    from spo.io import ensure_writable_dir, save_image, write_json, write_text
    from spo.show import generate as g
    from spo.show import infotext as it

    loras = list(loras or [])
    settings = settings or g.Settings()
    values = {k: list(v) for k, v in (values or {}).items() if v}
    for axis in (x, y):
        if axis not in AXES:
            raise SpoInputError(f"unknown axis {axis!r} (choose from {', '.join(AXES)})")
    if x == y:
        raise SpoInputError(f"x and y axes must differ (both {x!r})")
    if not prompts or any(not p.strip() for p in prompts):
        raise SpoInputError("give at least one non-empty prompt (--prompt or --prompts FILE)")
    values["prompt"] = list(prompts)
    values.setdefault("seed", [0])
    values.setdefault("steps", [settings.steps])
    values.setdefault("cfg", [settings.cfg])
    values.setdefault("scheduler", [settings.scheduler])
    values["scheduler"] = [g.check_scheduler(s) for s in values["scheduler"]]
    if loras:
        if not 0 <= lora_index < len(loras):
            raise SpoInputError(f"--sweep-lora {lora_index + 1}: there are {len(loras)} LoRAs")
        values.setdefault("strength", list(DEFAULT_STRENGTHS))
    elif "strength" in values or "strength" in (x, y):
        raise SpoInputError("a strength sweep needs a LoRA (--lora PATH)")
    init = g.load_init_image(init_image) if init_image else None
    if init is not None:
        values.setdefault("denoise", [settings.denoise if settings.denoise is not None else g.DEFAULT_DENOISE])
    elif "denoise" in values or "denoise" in (x, y):
        raise SpoInputError("a denoise sweep is img2img: give --init-image")
    for axis in (x, y):
        if axis not in values:
            raise SpoInputError(f"axis {axis!r} has no values")
    for st in values["steps"]:
        if st < 1:
            raise SpoInputError(f"steps must be at least 1, got {st}")
        for d in values.get("denoise", []):
            g.check_denoise(d, st)
    if settings.width is not None or settings.height is not None:
        g.check_size(settings.width or 8, settings.height or 8)
    scorer = _make_scorer(score, family) if score else None  # a bad scorer spec fails before generation
    out = check_output_dir(out)

    gen = g.Generator(model, loras, family=family, img2img=init is not None)
    size = gen.size(settings, init)
    page_axes = [a for a in AXES if a not in (x, y) and len(values.get(a, [])) > 1]
    fixed = {a: values[a][0] for a in AXES if a not in (x, y) and a in values and len(values[a]) == 1}
    # Each distinct generation setting makes all its (prompt, seed) images in one fixed order and batching.
    config_axes = [a for a in ("strength", "denoise", "scheduler", "steps", "cfg") if a in values]
    jobs = list(itertools.product(values["prompt"], values["seed"]))
    configs = list(itertools.product(*[values[a] for a in config_axes]))
    ensure_writable_dir(out / "cells")
    images: dict[tuple, object] = {}
    infos: dict[tuple, str] = {}
    for config in tqdm(configs, desc="sweep", unit="setting"):
        c = dict(zip(config_axes, config))
        st = _settings(settings, c, loras, lora_index)
        imgs = gen([p for p, _ in jobs], [s for _, s in jobs], st, init, batch=batch)
        for (p, s), im in zip(jobs, imgs):
            key = config + (p, s)
            images[key] = im
            infos[key] = gen.infotext(p, s, st, size)

    def key_of(cell: dict) -> tuple:
        return tuple(cell[a] for a in config_axes) + (cell["prompt"], cell["seed"])

    cells, pages = [], []
    for pi, page_vals in enumerate(itertools.product(*[values[a] for a in page_axes])):
        page = dict(zip(page_axes, page_vals))
        grid_cells = []
        for ri, yv in enumerate(values[y]):
            row = []
            for ci, xv in enumerate(values[x]):
                cell = {**fixed, **page, x: xv, y: yv}
                key = key_of(cell)
                name = f"cells/p{pi:02d}-r{ri:02d}-c{ci:02d}.png"
                save_image(images[key], out / name, pnginfo=it.pnginfo(infos[key]))
                cells.append({"file": name, "page": pi, "row": ri, "col": ci, **{a: cell[a] for a in cell}})
                row.append(images[key])
            grid_cells.append(row)
        title = " | ".join([f"x: {x}", f"y: {y}"] + [_fmt(a, v) for a, v in {**fixed, **page}.items()
                                                         if a not in ("strength",) or loras])
        grid = labelled_grid(grid_cells, [_fmt(y, v) for v in values[y]], [_fmt(x, v) for v in values[x]], title)
        gname = "grid.png" if pi == 0 else f"grid-p{pi:02d}.png"
        first = key_of({**fixed, **page, x: values[x][0], y: values[y][0]})
        meta = infos[first] + f"\nSweep: x={x} {values[x]}, y={y} {values[y]}"
        save_image(grid, out / gname, pnginfo=it.pnginfo(meta))
        pages.append({"file": gname, **page})
    result = {"format": "spo-sweep/1", "model": str(model), "x": x, "y": y, "pages": pages, "cells": cells,
              "values": {a: v for a, v in values.items()}, "fixed": fixed, "size": list(size),
              "loras": [{"name": s.name, "path": str(s.path), "strength": s.strength} for s in loras],
              "swept_lora": loras[lora_index].name if loras else None, "init_image": str(init_image) if init_image else None}
    if scorer is not None:
        result.update(_score_cells(scorer, score, cells, images, key_of, values, x,
                                   [loras[lora_index]] if loras else [], out, tolerance))
        with io.StringIO() as buf:
            cols = ["file", "page", "row", "col"] + [a for a in AXES if a in cells[0]] + list(cells[0]["scores"])
            w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for c in cells:
                w.writerow({**c, **c["scores"]})
            write_text(out / "scores.csv", buf.getvalue())
    write_json(out / "sweep.json", result)
    return result


def _settings(base, config: dict, loras, lora_index: int):
    from dataclasses import replace

    strengths = [s.strength for s in loras]
    if "strength" in config and loras:
        strengths[lora_index] = float(config["strength"])
    return replace(base, strengths=strengths, denoise=config.get("denoise", base.denoise),
                   scheduler=config.get("scheduler", base.scheduler), steps=int(config.get("steps", base.steps)),
                   cfg=float(config.get("cfg", base.cfg)))


def _make_scorer(spec: str, family: str | None):
    """"judge" (the toy judge: aesthetic + alignment) or an SPM folder / "module:function" scored at t = 0."""
    if spec in ("judge", "toy"):
        from spo import sources

        return sources.default().judge
    from spo.show.scoring import tensor_scorer

    fn = tensor_scorer(spec, family)
    return lambda ims, prompts: {"score": fn(ims, prompts)}


def _score_cells(scorer, spec, cells, images, key_of, values, x, loras, out: Path, tolerance) -> dict:
    from tqdm.auto import tqdm

    for c in tqdm(cells, desc="scoring", unit="img"):
        c["scores"] = {k: float(v[0]) for k, v in scorer([images[key_of(c)]], [c["prompt"]]).items()}
    main = "aesthetic" if "aesthetic" in cells[0]["scores"] else "score"
    axis = "strength" if loras and len(values.get("strength", [])) > 1 else x
    xs = values[axis]
    by = {v: [c for c in cells if c[axis] == v] for v in xs}
    stats = {str(v): {k: dict(zip(("mean", "ci95"), mean_ci([c["scores"][k] for c in cs])))
                      for k in cells[0]["scores"]} | {"n": len(cs)} for v, cs in by.items()}
    means = [stats[str(v)][main]["mean"] for v in xs]
    cis = [stats[str(v)][main]["ci95"] for v in xs]
    align = [stats[str(v)]["alignment"]["mean"] for v in xs] if "alignment" in cells[0]["scores"] else None
    suggestion = suggest_strengths(xs, means, cis, align, tolerance) if axis == "strength" else None
    plot_name = f"score_vs_{axis}.png"
    plot_scores(xs, {f"{main} ({spec})": (means, cis)}, f"{axis}" + (f" of {loras[0].name}" if axis == "strength" else ""),
                out / plot_name, suggestion, align)
    return {"scorer": spec, "score_axis": axis, "score_stats": stats, "suggestion": suggestion, "plot": plot_name}
