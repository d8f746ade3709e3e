"""One self-contained HTML page (images inlined as base64) for a training run, a sweep, or scored folders.

A training output folder (from `spo train`: lora/, samples/epoch-*.png, history.json, maybe
before_after.json) gets: seed-matched before/after pairs made on the spot from its base model and LoRA,
validation grids per epoch, training curves (loss, kept fraction, mean score). A sweep folder gets its grids,
suggested strengths, score tables and plot. Extra sweep / score folders can be added to either.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from spo import sources
from spo.errors import SpoInputError


def _b64_png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _pil_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _figure(src: str, caption: str, name: str | None = None) -> str:
    alt = html.escape(name or caption)
    return (f'<figure><img src="{src}" alt="{alt}" title="{alt}"><figcaption>{html.escape(caption)}</figcaption>'
            "</figure>")


def _file_figure(path: Path, root: Path, caption: str | None = None) -> str:
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    return _figure(_b64_png(path.read_bytes()), caption or rel, rel)


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SpoInputError(f"{path}: cannot read ({exc})") from None


def _ci_text(s: dict) -> str:
    """"mean [low, high]" for a saved interval, "mean ± half-width" where only a half-width was saved."""
    ci = s.get("ci95_range", s["ci95"])
    if isinstance(ci, list):
        return f"{s['mean']:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]"
    return f"{s['mean']:.4g} ± {ci:.3g}"


# The one win rate of every page, named where a win rate is shown.
WIN_RATE = ("win rate: the share of seed-matched pairs (same prompt and seed) in which the first image (with the "
            "LoRA, after, or folder A) scores higher than the second (strength 0, before, or folder B), a tie "
            "counting one half, with its 95 % Wilson interval")


def folder_kind(folder: Path) -> str:
    if (folder / "sweep.json").is_file():
        return "sweep"
    if (folder / "history.json").is_file() or (folder / "samples").is_dir() or (folder / "lora").is_dir():
        return "training"
    if (folder / "summary.json").is_file():
        return "scores"
    if (folder / "index.json").is_file():
        return "images"
    raise SpoInputError(f"{folder}: not a training output, sweep, score or generate folder "
                        "(no history.json, samples/, lora/, sweep.json, summary.json or index.json)")


# ------------------------------------------------------------------------------------------ sections


def training_curves(history: list[dict]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "kept_fraction", "mean_score") if any(k in h for h in history)]
    if not history or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), dpi=100, squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(i, h[k]) for i, h in enumerate(history) if isinstance(h.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(k.replace("_", " "))
        ax.set_xlabel("batch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def before_after_pairs(folder: Path, n: int, base: str | None, prompts: list[str] | None, seed: int = 0):
    """Seed-matched images of the base (LoRA at 0) and of the trained LoRA (at 1): (html, table rows)."""
    from spo.show.generate import Generator, Settings, parse_lora
    from spo.show.grid import labelled_grid

    lora_dir = folder / "lora"
    summary_path = lora_dir / "training_summary.json"
    summary = _read_json(summary_path) if summary_path.is_file() else {}
    base = base or summary.get("base") or summary.get("config", {}).get("base")
    if not base:
        return "<p>No before/after pairs: the base model is unknown (give --base).</p>", None
    source = sources.get(base)
    if not prompts:
        if source is None:
            return "<p>No before/after pairs: give --prompt or --prompts (this base model has no built-in prompts).</p>", None
        prompts = source.heldout_prompts(n, seed + 77)
    prompts = (prompts * n)[:n]
    gen = Generator(base, [parse_lora(str(lora_dir))])
    seeds = [seed + i for i in range(n)]
    before = gen(prompts, seeds, Settings(strengths=[0.0]))
    after = gen(prompts, seeds, Settings(strengths=[1.0]))
    grid = labelled_grid([[b, a] for b, a in zip(before, after)], [f"seed {s}: {p}" for s, p in zip(seeds, prompts)],
                         ["before (base)", "after (base + LoRA)"], f"DDIM 20 steps, CFG 5, {base}")
    rows = None
    if source is not None and source.judge is not None:
        from spo.stats import mean_summary, win_fractions

        judged_b, judged_a = source.judge(before, prompts), source.judge(after, prompts)
        aes_b, aes_a = judged_b["aesthetic"], judged_a["aesthetic"]
        al_b, al_a = judged_b["alignment"], judged_a["alignment"]
        wins = win_fractions(aes_a, aes_b)
        rows = [["judge aesthetic", _ci_text(mean_summary(aes_b)), _ci_text(mean_summary(aes_a))],
                ["judge alignment", _ci_text(mean_summary(al_b, proportion=True)),
                 _ci_text(mean_summary(al_a, proportion=True))],
                [f"aesthetic win rate, after (A) vs before (B), over these {n} pairs", "",
                 _ci_text(mean_summary(wins, proportion=True))]]
    body = _figure(_b64_png(_pil_bytes(grid)), f"{n} seed-matched pairs: left without, right with the LoRA",
                   "before_after_pairs")
    if rows:
        body += _table(["measure (95% CI)", "before", "after"], rows)
    return body, rows


def sweep_section(folder: Path, root: Path) -> str:
    data = _read_json(folder / "sweep.json")
    parts = [f"<p>x: <b>{html.escape(data['x'])}</b> {html.escape(str(data['values'].get(data['x'])))}, "
             f"y: <b>{html.escape(data['y'])}</b> {html.escape(str(data['values'].get(data['y'])))}; "
             f"model {html.escape(data['model'])}; LoRAs: "
             f"{html.escape(', '.join(lo['name'] for lo in data.get('loras', [])) or 'none')}</p>"]
    if data.get("suggestion"):
        parts.append(f'<p class="suggest">{html.escape(data["suggestion"]["text"])}</p>')
        comps = data["suggestion"].get("comparisons") or []
        if comps:
            align = "alignment_change_points" in comps[0]
            parts.append(_table(
                ["strength", "pairs", "difference from strength 0 [95% CI]", "win rate vs strength 0 [95% CI]",
                 "wins / ties / losses"] + (["alignment change (points) [95% CI]"] if align else []),
                [[c["strength"], c["n"], _ci_text({"mean": c["difference"], "ci95": c["ci95"]}),
                  _ci_text({"mean": c["win_rate"], "ci95": c["win_rate_ci95"]}), f"{c['wins']} / {c['ties']} / {c['losses']}"]
                 + ([_ci_text({"mean": c["alignment_change_points"], "ci95": c["alignment_ci95_points"]})] if align else [])
                 for c in comps]))
    elif data.get("suggestion_note"):
        parts.append(f'<p class="suggest">{html.escape(data["suggestion_note"])}</p>')
    for page in data["pages"]:
        parts.append(_file_figure(folder / page["file"], root))
    if data.get("plot") and (folder / data["plot"]).is_file():
        parts.append(_file_figure(folder / data["plot"], root))
    stats = data.get("score_stats")
    if stats:
        cols = [k for k in next(iter(stats.values())) if k != "n"]
        parts.append(_table([data["score_axis"], "n"] + [f"{c} (mean [95% CI])" for c in cols],
                            [[v, s["n"]] + [_ci_text(s[c]) for c in cols] for v, s in stats.items()]))
    links = " ".join(f'<a href="{html.escape(_rel(folder / c["file"], root))}">{html.escape(c["file"])}</a>'
                     for c in data["cells"])
    parts.append(f"<details><summary>{len(data['cells'])} cell images (files beside this report)</summary>{links}</details>")
    return "\n".join(parts)


def _rel(path: Path, root: Path) -> str:
    import os

    return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()


def scores_section(folder: Path) -> str:
    data = _read_json(folder / "summary.json")
    if "a_vs_b" in data:
        rows = [[col, _ci_text(r["win_rate"]), r["wins"], r["ties"], r["losses"], _ci_text(r["difference"])]
                for col, r in data["a_vs_b"].items()]
        return (f"<p>{html.escape(data['a'])} (A) vs {html.escape(data['b'])} (B), {data['n_pairs']} seed-matched pairs</p>"
                + _table(["score", f"A win rate over {data['n_pairs']} pairs [95% CI]", "wins", "ties", "losses",
                          "mean A - B [95% CI]"], rows))
    rows = [[col, s["n"], _ci_text(s)] for col, s in data.get("scores", {}).items()]
    return f"<p>{html.escape(str(data.get('folder', folder)))}</p>" + _table(["score", "n", "mean [95% CI]"], rows)


def images_section(folder: Path, root: Path, limit: int = 64) -> str:
    files = sorted(folder.glob("*.png"))[:limit]
    return '<div class="row">' + "".join(_file_figure(f, root) for f in files) + "</div>"


def training_section(folder: Path, root: Path, pairs: int, base: str | None, prompts: list[str] | None) -> str:
    parts = []
    lora = folder / "lora"
    if (lora / "training_summary.json").is_file():
        s = _read_json(lora / "training_summary.json")
        parts.append(_table(["method", "family", "base", "epochs", "steps", "seconds"],
                            [[s.get("method", ""), s.get("family", ""), s.get("base", ""), s.get("epochs", ""),
                              s.get("steps", ""), s.get("seconds", "")]]))
    if pairs > 0 and (lora / "pytorch_lora_weights.safetensors").is_file():
        body, _ = before_after_pairs(folder, pairs, base, prompts)
        parts.append("<h3>Before / after (same seeds and prompts)</h3>" + body)
    if (folder / "before_after.json").is_file():
        ba = _read_json(folder / "before_after.json")
        parts.append(f"<p>Evaluation saved with the run (before_after.json): {html.escape(ba.get('text', ''))}</p>")
    if (folder / "before_after.png").is_file():
        parts.append(_file_figure(folder / "before_after.png", root, "before_after.png: base / LoRA, pairs side by side"))
    history = _read_json(folder / "history.json") if (folder / "history.json").is_file() else []
    curves = training_curves(history)
    if curves:
        parts.append("<h3>Training curves</h3>" + _figure(_b64_png(curves), "loss, kept fraction and mean score per batch",
                                                          "training_curves"))
    samples = sorted((folder / "samples").glob("epoch-*.png"))
    if samples:
        parts.append("<h3>Validation grids per epoch (same prompts and seeds)</h3><div class=\"row\">"
                     + "".join(_file_figure(p, root) for p in samples) + "</div>")
    return "\n".join(parts)


CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%;image-rendering:pixelated}figure{display:inline-block;margin:.5em;vertical-align:top}
figcaption{font-size:.85em;color:#555}table{border-collapse:collapse;margin:.8em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}.suggest{background:#e8f5e9;padding:.5em}
details a{margin-right:.6em;font-size:.85em}"""


def build_report(folder: str | Path, out: str | Path | None = None, *, sweeps=(), scores=(), pairs: int = 8,
                 base: str | None = None, prompts: list[str] | None = None, title: str | None = None) -> Path:
    from spo.io import check_output_dir, write_text

    folder = Path(folder)
    if not folder.is_dir():
        raise SpoInputError(f"{folder}: no such folder")
    kind = folder_kind(folder)
    for s in sweeps:
        if not (Path(s) / "sweep.json").is_file():
            raise SpoInputError(f"--sweep {s}: no sweep.json there (run `spo sweep` first)")
    for s in scores:
        if not (Path(s) / "summary.json").is_file():
            raise SpoInputError(f"--scores {s}: no summary.json there (run `spo score` first)")
    out = Path(out) if out else folder / "report.html"
    check_output_dir(out.parent)
    if out.is_dir():
        raise SpoInputError(f"{out} is a folder; give the report's file name")
    root = out.parent
    sections = []
    if kind == "training":
        sections.append(("Training run", training_section(folder, root, pairs, base, prompts)))
    elif kind == "sweep":
        sections.append(("Strength sweep", sweep_section(folder, root)))
    elif kind == "scores":
        sections.append(("Scores", scores_section(folder)))
    else:
        sections.append(("Images", images_section(folder, root)))
    for s in sweeps:
        sections.append((f"Sweep: {Path(s).name}", sweep_section(Path(s), root)))
    for s in scores:
        sections.append((f"Scores: {Path(s).name}", scores_section(Path(s))))
    title = title or f"SPO report: {folder.resolve().name}"
    body = "\n".join(f"<section><h2>{html.escape(h)}</h2>\n{b}</section>" for h, b in sections)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n"
            "<p><small>Images are seed-matched: cells and pairs differ only in the stated setting. "
            "Intervals are 95 %: Student t for means of fewer than 100 values (normal from there), Wilson for "
            f"proportions (alignment, win rates), kept inside the range of the score where it is known. "
            f"{html.escape(WIN_RATE[0].upper() + WIN_RATE[1:])}.</small></p></body></html>\n")
    write_text(out, page)
    return out
