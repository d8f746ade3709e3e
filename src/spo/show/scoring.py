"""Score a folder of images with the scorers at hand; summaries with 95% intervals (spo.stats); seed-matched win rates.

Scorers: the toy judge (aesthetic + alignment; exact for toy captions), a step-aware preference model at
t = 0 (or any "module:function" scorer), and, when the user has the weights locally, PickScore (a CLIPModel
folder: logit_scale * cos), HPSv2 and ImageReward (their own packages), the LAION aesthetic predictor
(its MLP head on CLIP ViT-L/14 image embeddings). Nothing is downloaded.

Prompts come from --prompt, a prompts file (CSV with file,prompt columns or JSON), the folder's index.json
(written by `spo generate`) or sweep.json, or the A1111 "parameters" chunk of each PNG.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np

from spo import stats
from spo.errors import SpoInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# ------------------------------------------------------------------------------------------- inputs


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SpoInputError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise SpoInputError(f"{folder}: no images in it ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _sidecar(folder: Path) -> dict[str, dict]:
    """file name -> {"prompt", "seed"} from a generate index.json or a sweep.json in the folder."""
    out: dict[str, dict] = {}
    for name, key in (("index.json", "images"), ("sweep.json", "cells")):
        path = folder / name
        if path.is_file():
            try:
                items = json.loads(path.read_text(encoding="utf-8")).get(key, [])
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
            for e in items:
                if isinstance(e, dict) and "file" in e and "prompt" in e:
                    out[Path(e["file"]).name] = {"prompt": e["prompt"], "seed": e.get("seed")}
    return out


def read_prompt_map(path: str | Path) -> dict[str, str]:
    """A prompts file for scoring: CSV with file and prompt columns, or JSON {file: prompt} / [{file, prompt}]."""
    path = Path(path)
    if not path.is_file():
        raise SpoInputError(f"prompts file {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpoInputError(f"prompts file {path}: invalid JSON ({exc.msg})") from None
        if isinstance(data, dict):
            items = data.get("images", data) if isinstance(data.get("images"), list) else data
            if isinstance(items, dict):
                return {Path(k).name: str(v) for k, v in items.items()}
            data = items
        if isinstance(data, list) and all(isinstance(e, dict) and "file" in e and ("prompt" in e or "caption" in e)
                                          for e in data):
            return {Path(e["file"]).name: str(e.get("prompt", e.get("caption"))) for e in data}
        raise SpoInputError(f"prompts file {path}: expected {{file: prompt}} or a list of {{file, prompt}}")
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or "file" not in rows[0] or not ({"prompt", "caption"} & set(rows[0])):
        raise SpoInputError(f"prompts file {path}: CSV needs 'file' and 'prompt' columns")
    return {Path(r["file"]).name: r.get("prompt", r.get("caption")) for r in rows}


_SEED_NAME = re.compile(r"^\d+-(-?\d+)$")


def image_records(folder: str | Path, prompt: str | None = None, prompts_file: str | Path | None = None) -> list[dict]:
    """[{file, path, prompt, seed}] for every image of the folder; fails if any image has no prompt."""
    from spo.show.infotext import read_png

    folder = Path(folder)
    files = list_images(folder)
    given = read_prompt_map(prompts_file) if prompts_file else {}
    side = _sidecar(folder)
    records = []
    for f in files:
        meta = side.get(f.name, {})
        info = _png_info(f, read_png) if f.suffix.lower() == ".png" else None
        p = prompt or given.get(f.name) or meta.get("prompt") or (info["prompt_text"] if info else None)
        if not p:
            raise SpoInputError(f"{f}: no prompt for it (no PNG parameters, index.json or prompts file; give --prompt)")
        seed = meta.get("seed")
        if seed is None and info and "Seed" in info["params"]:
            try:
                seed = int(info["params"]["Seed"])
            except ValueError:
                seed = None
        if seed is None and (m := _SEED_NAME.match(f.stem)):
            seed = int(m.group(1))
        records.append({"file": f.name, "path": f, "prompt": p, "seed": seed})
    return records


def _load_pil(paths):
    return [open_image(p) for p in paths]


def _guarded(path: Path, what: str, read):
    """read() under PIL's decompression-bomb limit (its warning made an error too), every failure one line: a
    text file named .png, a truncated file or a 100k x 100k bomb is refused, not a traceback."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return read()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SpoInputError(f"{what} {path}: more than {Image.MAX_IMAGE_PIXELS} pixels, too large to decode "
                            "(a decompression bomb?)") from None
    except MemoryError:
        raise SpoInputError(f"{what} {path}: too large to decode") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib.error... for bad files
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise SpoInputError(f"{what} {path}: cannot read as an image ({reason})") from None


def open_image(path: str | Path, what: str = "image"):
    """An RGB PIL image from a file, or one line saying why not."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise SpoInputError(f"{what} {path}: no such file")

    def read():
        with Image.open(path) as im:
            return im.convert("RGB")

    return _guarded(path, what, read)


def _png_info(path: Path, read_png) -> dict | None:
    """A PNG's parameters (spo.show.infotext.read_png), with an unreadable file refused in one line."""
    return _guarded(path, "image", lambda: read_png(path))


# ------------------------------------------------------------------------------------------- scorers


def pil_scorer(fn):
    """f(8-bit PIL images, prompts) -> [float] as a Scorer of the one protocol (spo.spm.scoring.Scorer): the
    [-1, 1] batch is turned back into the very same 8-bit images, so such a scorer's figures do not change."""
    from spo.images import tensor_to_images

    def scorer(images, prompts, timesteps=None):
        return [float(v) for v in fn(tensor_to_images(images), list(prompts))]

    return scorer


def score_pil(scorer, images, prompts) -> list[float]:
    """Score PIL images (any sizes) with a Scorer at t = 0: one [-1, 1] batch per image size, results in order."""
    import torch

    from spo.images import images_to_tensor

    out: list[float] = [0.0] * len(images)
    by_size: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(im.size, []).append(i)
    for idx in by_size.values():
        with torch.no_grad():
            got = scorer(images_to_tensor([images[i] for i in idx]), [prompts[i] for i in idx],
                         torch.zeros(len(idx), dtype=torch.long))
        vals = got.float().cpu().tolist() if isinstance(got, torch.Tensor) else [float(v) for v in got]
        if len(vals) != len(idx):
            raise SpoInputError(f"a scorer returned {len(vals)} scores for {len(idx)} images")
        for i, v in zip(idx, vals):
            out[i] = v
    return out


def pickscore_scorer(folder: str | Path):
    """PickScore-style: logit_scale.exp() * cos(image, text) with a local CLIPModel folder (and its processor)."""
    import torch

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SpoInputError(f"--pickscore {folder}: not a CLIPModel folder (no config.json); download PickScore_v1 first")
    try:
        from transformers import AutoProcessor, CLIPModel

        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SpoInputError(f"--pickscore {folder}: cannot load a CLIP model and processor ({str(exc).splitlines()[0]})") from None

    @torch.no_grad()
    def score(images, prompts):
        inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                           truncation=True, max_length=77)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (img * txt).sum(-1)).tolist()

    return score


def laion_aesthetic_scorer(head: str | Path, clip_folder: str | Path | None):
    """The LAION improved aesthetic predictor: a stack of Linear layers on normalised CLIP ViT-L/14 image embeddings."""
    import torch

    head, clip_folder = Path(head), Path(clip_folder) if clip_folder else None
    if not head.is_file():
        raise SpoInputError(f"--laion-aesthetic {head}: no such file (the MLP head, e.g. sac+logos+ava1-l14-linearMSE.pth)")
    if clip_folder is None or not (clip_folder / "config.json").is_file():
        raise SpoInputError("--laion-aesthetic needs --laion-clip DIR: a local CLIP ViT-L/14 CLIPModel folder")
    if head.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(head))
    else:
        state = torch.load(head, map_location="cpu", weights_only=True)
    weights = sorted((k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2),
                     key=lambda k: [int(t) if t.isdigit() else t for t in k.split(".")])
    if not weights:
        raise SpoInputError(f"--laion-aesthetic {head}: no Linear layers in it")
    layers = []
    for k in weights:
        lin = torch.nn.Linear(state[k].shape[1], state[k].shape[0])
        lin.weight.data.copy_(state[k])
        lin.bias.data.copy_(state[k[:-len("weight")] + "bias"])
        layers.append(lin)
    mlp = torch.nn.Sequential(*layers).eval()  # the published head has no activations (dropout only in training)
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(clip_folder, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(clip_folder, local_files_only=True)

    @torch.no_grad()
    def score(images, prompts):
        emb = model.get_image_features(**processor(images=list(images), return_tensors="pt"))
        if emb.shape[-1] != layers[0].in_features:
            raise SpoInputError(f"--laion-clip gives {emb.shape[-1]}-d embeddings; the head needs {layers[0].in_features}")
        return mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1).tolist()

    return score


def hpsv2_scorer(version: str = "v2.1"):
    import importlib.util

    if importlib.util.find_spec("hpsv2") is None:
        raise SpoInputError("--hpsv2 needs the hpsv2 package and its checkpoint in its cache (pip install hpsv2)")

    def score(images, prompts):
        import hpsv2

        try:
            return [float(hpsv2.score([im], p, hps_version=version)[0]) for im, p in zip(images, prompts)]
        except Exception as exc:  # its loader downloads on a miss; offline that fails somewhere inside
            raise SpoInputError(f"--hpsv2: scoring failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                                "is the HPSv2 checkpoint in hpsv2's cache?") from None

    return score


def imagereward_scorer(weights: str):
    try:
        import ImageReward as RM
    except ImportError:
        raise SpoInputError("--imagereward needs the image-reward package (pip install image-reward) and local weights") from None
    if not Path(weights).is_file():
        raise SpoInputError(f"--imagereward {weights}: no such file (ImageReward.pt)")
    try:
        model = RM.load(weights)
    except Exception as exc:  # it may try to fetch its BLIP config: offline that fails inside the package
        raise SpoInputError(f"--imagereward: cannot load {weights} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None

    def score(images, prompts):
        return [float(model.score(p, [im])) for im, p in zip(images, prompts)]

    return score


def build_scorers(*, judge: bool = False, spm: str | None = None, family: str | None = None,
                  pickscore: str | None = None, hpsv2: bool = False, imagereward: str | None = None,
                  laion_aesthetic: str | None = None, laion_clip: str | None = None) -> dict:
    """name -> {column: Scorer} (spo.spm.scoring.Scorer, the one protocol). The toy judge is the default.

    SPMs, CLIP folders and "module:function" scorers come from spo.spm.scoring.load_scorer; the packages that
    take PIL images (PickScore's processor, HPSv2, ImageReward, the LAION head, the judge) through pil_scorer.
    """
    from spo.spm.scoring import load_scorer

    scorers = {}
    if spm:
        scorers["spm"] = {"spm_t0": load_scorer(spm, family=family)}
    if pickscore:
        scorers["pickscore"] = {"pickscore": pil_scorer(pickscore_scorer(pickscore))}
    if hpsv2:
        scorers["hpsv2"] = {"hpsv2": pil_scorer(hpsv2_scorer())}
    if imagereward:
        scorers["imagereward"] = {"imagereward": pil_scorer(imagereward_scorer(imagereward))}
    if laion_aesthetic:
        scorers["laion_aesthetic"] = {"laion_aesthetic": pil_scorer(laion_aesthetic_scorer(laion_aesthetic, laion_clip))}
    if judge or not scorers:
        from spo import sources

        judge = sources.default().judge  # (PIL images, prompts) -> {"aesthetic": [...], "alignment": [...]}
        scorers["judge"] = {col: pil_scorer(lambda ims, ps, col=col: judge(ims, ps)[col])
                            for col in ("aesthetic", "alignment")}
    return scorers


# ------------------------------------------------------------------------------------------- scoring


def score_records(records: list[dict], scorers: dict, chunk: int = 16, desc: str = "scoring") -> list[dict]:
    from tqdm.auto import tqdm

    rows = [{"file": r["file"], "prompt": r["prompt"], "seed": r["seed"]} for r in records]
    for start in tqdm(range(0, len(records), chunk), desc=desc, unit="batch"):
        part = records[start:start + chunk]
        images = _load_pil([r["path"] for r in part])
        prompts = [r["prompt"] for r in part]
        for columns in scorers.values():
            for col, scorer in columns.items():
                for row, v in zip(rows[start:start + chunk], score_pil(scorer, images, prompts)):
                    row[col] = v
    return rows


# Score columns that are 0/1 per image: their summaries are proportions (Wilson intervals, inside [0, 1]).
PROPORTION_COLUMNS = ("alignment",)


def score_columns(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if k not in ("file", "prompt", "seed")] if rows else []


def summarize(rows: list[dict]) -> dict:
    """Per score column: mean with its 95 % interval (spo.stats: Student t for small n; Wilson for proportions)."""
    return {col: stats.mean_summary([r[col] for r in rows], proportion=col in PROPORTION_COLUMNS)
            for col in score_columns(rows)}


def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def match_records(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs of images made from the same seed and prompt (or, failing that, with the same file name)."""
    def key(r):
        return (r["seed"], r["prompt"]) if r["seed"] is not None else None

    kb = {key(r): r for r in b if key(r) is not None}
    pairs = [(r, kb[key(r)]) for r in a if key(r) in kb]
    if not pairs:
        nb = {r["file"]: r for r in b}
        pairs = [(r, nb[r["file"]]) for r in a if r["file"] in nb]
    if not pairs:
        raise SpoInputError("no seed-matched images: the folders share no (seed, prompt) and no file names")
    return pairs


def win_rates(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Per score: win rate of A over B (the share of seed-matched pairs where A scores higher, ties counting one
    half; Wilson 95 % interval) and the mean paired difference A - B (Student t 95 % interval for small n)."""
    out = {}
    for col in score_columns(rows_a):
        a = np.array([r[col] for r in rows_a])
        b = np.array([r[col] for r in rows_b])
        wins = stats.win_fractions(a, b)
        bounds = (-1.0, 1.0) if col in PROPORTION_COLUMNS else None  # a difference of two 0/1 scores
        out[col] = {"win_rate": stats.mean_summary(wins, proportion=True),
                    "difference": stats.mean_summary(a - b, bounds),
                    "wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum())}
    return out
