"""Side-by-side grids: any two of strength / denoise / seed / scheduler / steps / cfg / prompt as axes.

Every cell of a grid uses the same seeds and prompts as its neighbours, so two cells differ only in the
swept values. Axes not drawn but given several values become separate pages. When a scorer is at hand
(--score, or the model source's reference) every cell is scored at t = 0, and each strength is compared with
strength 0 on the same seeds and prompts (paired differences, spo.stats intervals): the suggested range is the
strengths whose gain is significant and whose alignment cost stays within a stated limit.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import textwrap
from pathlib import Path

import numpy as np

from spo import stats
from spo.errors import SpoInputError
from spo.io import check_output_dir
from spo.show.grid import labelled_grid

AXES = ("strength", "denoise", "seed", "scheduler", "steps", "cfg", "prompt")
DEFAULT_STRENGTHS = (-1.0, 0.0, 0.5, 1.0, 1.5, 2.0)
MAX_STRENGTH = 100.0  # beyond this a LoRA multiplier only makes numerical garbage (e.g. 1e308: black images)
DEFAULT_MAX_ALIGNMENT_DROP = 2.0  # points: how much alignment a suggested strength may cost against strength 0


def _fmt(axis: str, value) -> str:
    from spo.show.infotext import fmt_number

    if axis in ("strength", "denoise", "cfg"):
        return f"{axis} {fmt_number(value)}"
    if axis == "prompt":
        text = str(value)
        return text if len(text) <= 48 else text[:45] + "..."
    return f"{axis} {value}"


def compare_with_zero(strengths, scores: dict, alignment: dict | None = None,
                      bounds: tuple[float, float] | None = None) -> list[dict]:
    """Per strength other than 0: its scores minus strength 0's on the same seeds and prompts.

    scores[s] / alignment[s]: per-item values in one matched order (item i of every strength has the same seed,
    prompt and other settings). The difference carries a paired 95 % interval (spo.stats: Student t for small n,
    kept inside the range of the score when `bounds` is known), the win rate a Wilson one.
    """
    zero = np.asarray(scores[0.0], dtype=float)
    out = []
    for s in sorted(strengths):
        if s == 0.0:
            continue
        x = np.asarray(scores[s], dtype=float)
        d = stats.paired_difference(x, zero, bounds)
        wins = stats.proportion_interval(stats.win_fractions(x, zero))
        row = {"strength": float(s), "n": d.n, "difference": d.estimate, "ci95": d.as_pair(), "interval": d.method,
               "significant": bool(d.low > 0), "win_rate": wins.estimate, "win_rate_ci95": wins.as_pair(),
               "wins": int((x > zero).sum()), "ties": int((x == zero).sum()), "losses": int((x < zero).sum())}
        if alignment is not None:
            a = stats.paired_difference(alignment[s], alignment[0.0], (0.0, 1.0))
            row |= {"alignment_change_points": 100 * a.estimate, "alignment_ci95_points": [100 * v for v in a.as_pair()]}
        out.append(row)
    return out


def suggest_strengths(comparisons: list[dict], max_alignment_drop: float = DEFAULT_MAX_ALIGNMENT_DROP,
                      score_name: str = "score") -> dict:
    """The strengths whose gain over strength 0 is significant (paired 95 % interval above 0) and whose mean
    alignment is at most `max_alignment_drop` points below strength 0's: the contiguous run of them around the
    one with the largest gain. No such strength: best/low/high are None and the text says why."""
    def align_ok(c):
        return c.get("alignment_change_points", 0.0) >= -max_alignment_drop

    n = comparisons[0]["n"] if comparisons else 0
    good = [c["significant"] and align_ok(c) for c in comparisons]
    rule = (f"paired 95% interval of the {score_name} gain over strength 0 above 0, same {n} seeds and prompts"
            + (f"; alignment at most {max_alignment_drop:g} points below strength 0"
               if any("alignment_change_points" in c for c in comparisons) else ""))
    base = {"rule": rule, "max_alignment_drop_points": max_alignment_drop, "comparisons": comparisons}
    if not any(good):
        costly = [c["strength"] for c in comparisons if c["significant"] and not align_ok(c)]
        if costly:
            why = (f"no strength suggested: {', '.join(f'{s:g}' for s in costly)} raise {score_name} significantly "
                   f"but lose more than {max_alignment_drop:g} alignment points (--max-alignment-drop)")
        else:
            why = (f"no strength is significantly better than 0 by {score_name} (paired 95% intervals over {n} seed/prompt "
                   "pairs all reach 0 or below; more seeds or prompts narrow them)")
        return {"best": None, "low": None, "high": None, "text": why, **base}
    best = max((i for i, g in enumerate(good) if g), key=lambda i: comparisons[i]["difference"])
    # the run of good strengths around the best, on its side of 0 (0 itself is the reference, never in a range)
    run = [g and (c["strength"] > 0) == (comparisons[best]["strength"] > 0) for g, c in zip(good, comparisons)]
    lo = hi = best
    while lo > 0 and run[lo - 1]:
        lo -= 1
    while hi < len(run) - 1 and run[hi + 1]:
        hi += 1
    b = comparisons[best]
    gain = f"{b['difference']:+.3g} [{b['ci95'][0]:+.3g}, {b['ci95'][1]:+.3g}]"
    text = (f"suggested strength {comparisons[lo]['strength']:g} to {comparisons[hi]['strength']:g} "
            f"(best {b['strength']:g}: {score_name} {gain} over strength 0; rule: {rule})")
    return {"best": b["strength"], "low": comparisons[lo]["strength"], "high": comparisons[hi]["strength"],
            "text": text, **base}


def plot_scores(xs, rows: dict[str, tuple[list, list, list]], xlabel: str, target: Path, suggestion: dict | None = None,
                alignment: list | None = None) -> None:
    """Mean score with its 95% interval against the swept values (rows: name -> (means, lows, highs)); alignment
    on a second axis; with a strength suggestion, a second panel of the paired differences from strength 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spo.io import write_bytes

    comps = (suggestion or {}).get("comparisons") or []
    fig, axes = plt.subplots(1, 2 if comps else 1, figsize=(11 if comps else 6, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    numeric = all(isinstance(x, (int, float)) for x in xs)
    pos = list(xs) if numeric else list(range(len(xs)))
    for name, (means, lows, highs) in rows.items():
        err = [[m - lo for m, lo in zip(means, lows)], [hi - m for m, hi in zip(means, highs)]]
        ax.errorbar(pos, means, yerr=err, marker="o", capsize=3, label=name)
    if suggestion is not None and suggestion.get("low") is not None and numeric:
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
    if comps:
        bx = axes[0][1]
        d = [c["difference"] for c in comps]
        bx.errorbar([c["strength"] for c in comps], d, yerr=[[v - c["ci95"][0] for v, c in zip(d, comps)],
                                                            [c["ci95"][1] - v for v, c in zip(d, comps)]],
                    marker="o", capsize=3, linestyle="none")
        bx.axhline(0, color="grey", lw=0.8, ls="--")
        bx.set_xlabel(xlabel)
        bx.set_ylabel("difference from strength 0 (paired 95% CI)")
        bx.set_title("\n".join(textwrap.wrap(suggestion["text"], 90)[:3]), fontsize=7)
        bx.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes(target, buf.getvalue())


def sweep(model: str, prompts: list[str], out, *, loras=None, values: dict[str, list] | None = None,
          x: str = "strength", y: str = "seed", settings=None, init_image=None, lora_index: int = 0,
          score: str | None = None, family: str | None = None,
          max_alignment_drop: float = DEFAULT_MAX_ALIGNMENT_DROP, batch: int = 8, log=print, vae=None) -> dict:
    """Generate, draw and score the grids; returns the sweep.json content.

    score: "judge", an SPM / CLIP folder or "module:function"; None: the model source's reference scorers
    (spo.sources: the judge of the built-in toy models), none for a checkpoint path; "none": do not score. A
    strength sweep that is scored always contains strength 0 (added when missing): the suggestion compares every
    strength with it.
    """
    from tqdm.auto import tqdm

    from spo.io import ensure_writable_dir, write_json
    from spo.show import generate as g

    loras = list(loras or [])
    settings = settings or g.Settings()
    values, init = _checked_values(values, prompts, x, y, settings, loras, lora_index, init_image)
    if not (math.isfinite(max_alignment_drop) and max_alignment_drop >= 0):
        raise SpoInputError(f"--max-alignment-drop must be a number of points >= 0, got {max_alignment_drop}")
    specs = _scorer_specs(score, model)
    scorer = _make_scorer(specs, family) if specs else None  # a bad scorer spec fails before generation
    strength_swept = bool(loras) and ("strength" in (x, y) or len(values["strength"]) > 1)
    if scorer is not None and strength_swept and 0.0 not in values["strength"]:
        values["strength"] = _with_zero(values["strength"])
        log("added strength 0: the suggestion compares every strength with the LoRA off on the same seeds")
    out = check_output_dir(out)

    gen = g.Generator(model, loras, family=family, img2img=init is not None, vae=vae,
                      prediction_type=settings.prediction_type, dtype=settings.dtype)
    size = gen.size(settings, init)
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

    cells, pages = _draw_pages(out, values, x, y, fixed, images, infos, key_of, bool(loras))
    result = {"format": "spo-sweep/1", "model": str(model), "x": x, "y": y, "pages": pages, "cells": cells,
              "values": {a: v for a, v in values.items()}, "fixed": fixed, "size": list(size),
              "loras": [{"name": s.name, "path": str(s.path), "strength": s.strength} for s in loras],
              "swept_lora": loras[lora_index].name if loras else None, "init_image": str(init_image) if init_image else None}
    if scorer is not None:
        result.update(_score_cells(scorer, ", ".join(spec for _, spec in specs), cells, images, key_of, values, x,
                                   [loras[lora_index]] if loras else [], out, max_alignment_drop))
        _write_scores_csv(out, cells)
    elif strength_swept:
        result["suggestion_note"] = ("no strength suggestion: " + ("scoring is off (--score none)" if score == "none" else
                                     f"no scorer for {model}; give --score SPM_DIR, a CLIP folder such as PickScore_v1, "
                                     "or package.module:function to score the cells"))
    write_json(out / "sweep.json", result)
    return result


def _checked_values(values, prompts, x: str, y: str, settings, loras, lora_index: int, init_image):
    """Every axis's values, defaults filled in and checked before anything loads; and the init image."""
    from spo.show import generate as g

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
        for v in values["strength"]:
            check_strength(v)
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
    for c in values["cfg"]:
        if not math.isfinite(c):
            raise SpoInputError(f"cfg {c} is not a finite number")
    return values, init


def _draw_pages(out: Path, values: dict, x: str, y: str, fixed: dict, images: dict, infos: dict, key_of,
                with_lora: bool) -> tuple[list, list]:
    """Save every cell and one labelled grid per page; (cells, pages) as sweep.json lists them."""
    from spo.io import save_image
    from spo.show import infotext as it

    page_axes = [a for a in AXES if a not in (x, y) and len(values.get(a, [])) > 1]
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
                                                         if a not in ("strength",) or with_lora])
        grid = labelled_grid(grid_cells, [_fmt(y, v) for v in values[y]], [_fmt(x, v) for v in values[x]], title)
        gname = "grid.png" if pi == 0 else f"grid-p{pi:02d}.png"
        first = key_of({**fixed, **page, x: values[x][0], y: values[y][0]})
        meta = infos[first] + f"\nSweep: x={x} {values[x]}, y={y} {values[y]}"
        save_image(grid, out / gname, pnginfo=it.pnginfo(meta))
        pages.append({"file": gname, **page})
    return cells, pages


def _write_scores_csv(out: Path, cells: list[dict]) -> None:
    from spo.io import write_text

    with io.StringIO() as buf:
        cols = ["file", "page", "row", "col"] + [a for a in AXES if a in cells[0]] + list(cells[0]["scores"])
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for c in cells:
            w.writerow({**c, **c["scores"]})
        write_text(out / "scores.csv", buf.getvalue())


def check_strength(value: float) -> float:
    """A LoRA strength a sweep can use: finite and at most MAX_STRENGTH in magnitude."""
    if not math.isfinite(value):
        raise SpoInputError(f"strength {value} is not a finite number")
    if abs(value) > MAX_STRENGTH:
        raise SpoInputError(f"strength {value:g} is outside -{MAX_STRENGTH:g}..{MAX_STRENGTH:g} "
                            "(a multiplier of the LoRA's weights; beyond that images are numerical noise)")
    return value


def _with_zero(strengths: list) -> list:
    """strengths with 0 added: in its place when they are ascending, else first."""
    if list(strengths) == sorted(strengths):
        return sorted([*strengths, 0.0])
    return [0.0, *strengths]


def _settings(base, config: dict, loras, lora_index: int):
    from dataclasses import replace

    strengths = [s.strength for s in loras]
    if "strength" in config and loras:
        strengths[lora_index] = float(config["strength"])
    return replace(base, strengths=strengths, denoise=config.get("denoise", base.denoise),
                   scheduler=config.get("scheduler", base.scheduler), steps=int(config.get("steps", base.steps)),
                   cfg=float(config.get("cfg", base.cfg)))


def _column(spec: str) -> str:
    """Score column of a source's reference scorer: its function name without "_preference" ("aesthetic")."""
    name = spec.partition(":")[2] if ":" in spec and not Path(spec).exists() else Path(spec).name
    return name.removesuffix("_preference") or "score"


def _scorer_specs(score: str | None, model) -> list[tuple[str, str]]:
    """[(column, spec)]: what --score names, else the model source's reference scorers, else nothing."""
    if score is not None:
        return [] if score == "none" else [("", score)]
    from spo.sources import get

    source = get(model)
    if source is None or not source.reference:
        return []
    return [(_column(spec), spec) for spec in (source.reference, *source.references)]


def _make_scorer(specs: list[tuple[str, str]], family: str | None) -> dict:
    """{column: Scorer} (spo.spm.scoring.Scorer, the one protocol), scored at t = 0: "judge" (aesthetic +
    alignment, as `spo score --judge`), or SPM / CLIP folders and "module:function" scorers, one column each."""
    from spo.show.scoring import build_scorers
    from spo.spm.scoring import load_scorer

    if specs[0][1] in ("judge", "toy"):
        return build_scorers(judge=True)["judge"]
    return {col or "score": load_scorer(spec, family=family) for col, spec in specs}


def _score_cells(scorer, spec, cells, images, key_of, values, x, loras, out: Path, max_alignment_drop) -> dict:
    from tqdm.auto import tqdm

    from spo.show.scoring import score_pil

    for c in tqdm(cells, desc="scoring", unit="img"):
        c["scores"] = {k: score_pil(f, [images[key_of(c)]], [c["prompt"]])[0] for k, f in scorer.items()}
    cols = list(cells[0]["scores"])
    main = cols[0]
    axis = "strength" if loras and len(values.get("strength", [])) > 1 else x
    xs = values[axis]
    by = {v: [c for c in cells if c[axis] == v] for v in xs}

    def summary(col, vals):  # "ci95": the half-width (as before); "ci95_range": [low, high], Wilson for alignment
        ci = stats.proportion_interval(vals) if col == "alignment" else stats.mean_interval(vals)
        return {"mean": ci.estimate, "ci95": ci.half_width, "ci95_range": ci.as_pair(), "interval": ci.method}

    score_stats = {str(v): {k: summary(k, [c["scores"][k] for c in cs]) for k in cols} | {"n": len(cs)}
                   for v, cs in by.items()}
    st = [score_stats[str(v)][main] for v in xs]
    rows = {f"{main} ({spec.split(', ')[0]})": ([m["mean"] for m in st], [m["ci95_range"][0] for m in st],
                                                [m["ci95_range"][1] for m in st])}
    align = [score_stats[str(v)]["alignment"]["mean"] for v in xs] if "alignment" in cols else None
    suggestion = None
    if axis == "strength":
        # item i of every strength: the same prompt, seed and other settings (the pairing of the comparison)
        def rest(c):
            return tuple((a, c[a]) for a in AXES if a != "strength" and a in c)

        order = [rest(c) for c in by[0.0]]
        matched = {v: {rest(c): c for c in cs} for v, cs in by.items()}

        def column(col):
            return {v: [matched[v][k]["scores"][col] for k in order] for v in xs}

        comparisons = compare_with_zero(xs, column(main), column("alignment") if "alignment" in cols else None,
                                        (0.0, 1.0) if main == "alignment" else None)
        suggestion = suggest_strengths(comparisons, max_alignment_drop, main)
    plot_name = f"score_vs_{axis}.png"
    plot_scores(xs, rows, f"{axis}" + (f" of {loras[0].name}" if axis == "strength" else ""),
                out / plot_name, suggestion, align)
    return {"scorer": spec, "score_axis": axis, "score_stats": score_stats, "suggestion": suggestion, "plot": plot_name}
