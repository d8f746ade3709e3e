"""`python benchmarks/run.py data-scale`: Pick-a-Pic at scale on a CPU (issue 21).

Writes a synthetic Pick-a-Pic-v2-schema set of at least --gb GiB (512 px JPEG pairs of varied content: smooth
fields, shapes, noise; many shards in the hub-cache layout data/train-000NN-of-000NN.parquet, row groups of
--rows-per-group rows, a few corrupt images) under --work (reused when complete), then measures:

- the index pass (small columns only) and, in this process, one worker's read and decode rates (pairs/s);
- `spo spm train` on the toy base for --steps steps with --num-workers workers: peak memory of the process tree
  (sum of RSS, and of PSS, which counts pages shared by the forked workers once), and the seconds the step
  waited for data;
- `spo spm eval` on a held-out shard (validation_unique) the same way.

Bar (issue 21): peak RSS <= 2 GB with >= 4 GB on disk.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIDE = 512
WORDS = ("a red fox", "an old lighthouse", "a bowl of ramen", "a cyberpunk city", "a watercolor cat", "two robots",
         "a castle on a hill", "a portrait of a knight", "sunflowers", "a spaceship", "a foggy forest", "a dragon")
STYLES = ("at sunset", "in the rain", "oil painting", "4k photo", "anime style", "isometric", "studio lighting", "")


def add_arguments(parser) -> None:
    parser.add_argument("--gb", type=float, default=4.1, help="GiB of parquet to write (default: %(default)s)")
    parser.add_argument("--shard-mb", type=float, default=128.0, help="MiB per shard (default: %(default)s)")
    parser.add_argument("--rows-per-group", type=int, default=64, help="rows per parquet row group")
    parser.add_argument("--heldout", type=int, default=256, help="pairs in the held-out shard")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    # one: on this 2-core machine one core steps and one decodes (a worker decodes ~10x faster than the toy steps)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--buffer-mb", type=float, default=512.0, help="--shuffle-buffer-mb of the training run")
    parser.add_argument("--work", default="outputs/bench-data-scale")


def synthetic_jpeg(rng) -> bytes:
    """A 512 px JPEG: an upscaled random field (smooth to busy), some flat shapes, grain of random strength."""
    from PIL import Image, ImageDraw

    lo = int(rng.integers(4, 96))
    image = Image.fromarray(rng.integers(0, 256, (lo, lo, 3), dtype=np.uint8)).resize((SIDE, SIDE), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 12))):
        x, y = (int(v) for v in rng.integers(0, SIDE, 2))
        w, h = (int(v) for v in rng.integers(10, 250, 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + w, y + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(image, dtype=np.int16)
    grain = int(rng.integers(0, 40))
    if grain:
        pixels = pixels + rng.integers(-grain, grain + 1, (SIDE, SIDE, 1), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG",
                                                                   quality=int(rng.integers(85, 96)))
    return buf.getvalue()


def synthetic_rows(rng, n: int, start: int) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        tie = rng.random() < 0.1
        l0 = 0.5 if tie else float(rng.integers(0, 2))
        im0, im1 = synthetic_jpeg(rng), synthetic_jpeg(rng)
        if i % 5003 == 17:  # a few corrupt images: skipped and counted when read
            im0 = im0[: len(im0) // 3]
        rows.append({"caption": f"{WORDS[rng.integers(len(WORDS))]} {STYLES[rng.integers(len(STYLES))]} #{i % 4000}",
                     "jpg_0": im0, "jpg_1": im1, "label_0": l0, "label_1": 1.0 - l0, "are_different": True,
                     "has_label": True, "image_0_uid": f"{i}-0", "image_1_uid": f"{i}-1", "best_image_uid":
                     "" if tie else f"{i}-{int(l0 == 0.0)}", "model_0": "toy-a", "model_1": "toy-b",
                     "user_id": int(rng.integers(0, 500)), "ranking_id": i})
    return rows


def write_shard(path: Path, rng, rows: int, start: int, per_group: int) -> int:
    """One shard, row group by row group (never a whole shard in memory); its bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name("." + path.name + ".tmp")
    writer = None
    for s in range(start, start + rows, per_group):
        table = pa.Table.from_pylist(synthetic_rows(rng, min(per_group, start + rows - s), s))
        writer = writer or pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
    writer.close()
    os.replace(tmp, path)
    return path.stat().st_size


def write_set(work: Path, gib: float, shard_mb: float, per_group: int, heldout: int) -> dict:
    """The training shards and the held-out shard (reused when a previous run completed them)."""
    from tqdm.auto import tqdm

    marker = work / "data-complete.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done["gib"] >= gib:
            return done
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    start_time, sizes, row = time.time(), [], 0
    rows_per_shard = max(per_group, int(shard_mb * 2**20 / 250_000) // per_group * per_group)
    bar = tqdm(total=int(gib * 2**30), unit="B", unit_scale=True, desc="writing shards")
    while sum(sizes) < gib * 2**30:
        sizes.append(write_shard(data / f"part-{len(sizes):05d}.parquet", rng, rows_per_shard, row, per_group))
        row += rows_per_shard
        bar.update(sizes[-1])
    bar.close()
    for i in range(len(sizes)):  # the hub-cache names, once the count is known
        os.replace(data / f"part-{i:05d}.parquet", data / f"train-{i:05d}-of-{len(sizes):05d}.parquet")
    (work / "heldout").mkdir(exist_ok=True)
    write_shard(work / "heldout" / "validation_unique-00000-of-00001.parquet", np.random.default_rng(1), heldout,
                10**8, per_group)
    done = {"gib": sum(sizes) / 2**30, "shards": len(sizes), "rows": row, "rows_per_group": per_group,
            "write_seconds": round(time.time() - start_time, 1)}
    marker.write_text(json.dumps(done))
    return done


def read_rates(work: Path, buffer_mb: float, batch: int) -> dict:
    """One worker's rates, in this process: the index pass, reading a window's row groups, decoding + resizing."""
    from spo.data.stream import BlockOrder, UnitReader, build_index
    from spo.images import images_to_tensor

    t = time.time()
    index = build_index(work / "data", buffer_bytes=int(buffer_mb * 2**20))
    index_s = time.time() - t
    rows, bounds = BlockOrder(index, 0, int(buffer_mb * 2**20)).epoch(0)
    window = rows[bounds[0]:bounds[1]]
    t = time.time()
    pairs = [p for p in UnitReader().read(index, window).values() if hasattr(p, "decode")]
    read_s = time.time() - t
    some = pairs[: 32 * batch]
    t = time.time()
    for s in range(0, len(some), batch):
        decoded = [d for d in map(_decoded, some[s: s + batch]) if d is not None]
        images_to_tensor([d[0] for d in decoded], 32), images_to_tensor([d[1] for d in decoded], 32)
    decode_s = time.time() - t
    window_bytes = sum(len(p.image_0) + len(p.image_1) for p in pairs)
    return {"rows_indexed": len(index), "units": len(index.units), "index_seconds": round(index_s, 2),
            "window_pairs": len(window), "window_mib": round(window_bytes / 2**20, 1),
            "read_pairs_per_s": round(len(pairs) / read_s, 1), "read_mib_per_s": round(window_bytes / 2**20 / read_s, 1),
            "decode_resize_pairs_per_s": round(len(some) / decode_s, 1)}


def _decoded(pair):
    """Both images, or None for the rows written corrupt (a truncated JPEG passes PIL's verify)."""
    from spo.errors import SpoInputError

    try:
        return pair.decode()
    except SpoInputError:
        return None


def watched(cmd: list[str]) -> dict:
    """Run a command, polling its process tree's memory every 0.5 s: peak sums of RSS and PSS (MB), seconds."""
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak_rss = peak_pss = 0.0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        rss = pss = 0.0
        try:
            for p in [root, *root.children(recursive=True)]:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:
            pass
        peak_rss, peak_pss = max(peak_rss, rss / 2**20), max(peak_pss, pss / 2**20)
        time.sleep(0.5)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}: {err[-3000:]}")
    return {"seconds": round(time.time() - start, 1), "peak_rss_tree_mb": round(peak_rss),
            "peak_pss_tree_mb": round(peak_pss), "stdout_tail": out[-1500:]}


def data_scale(args) -> dict:
    work = Path(args.work)
    written = write_set(work, args.gb, args.shard_mb, args.rows_per_group, args.heldout)
    rates = read_rates(work, args.buffer_mb, args.batch_size)
    spo = [sys.executable, "-m", "spo"]
    out = work / "spm-run"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    train_cmd = [*spo, "spm", "train", str(work / "data"), "--base", "toy:sd15", "--steps", str(args.steps),
                 "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers), "--shuffle-buffer-mb",
                 str(args.buffer_mb), "--lr", "1e-5", "--warmup", "10", "--checkpoint-every", "100", "--report-to",
                 "none", "--cpu", "--no-progress", "--out", str(out)]
    train = watched(train_cmd)
    summary = json.loads((out / "spm" / "spm_config.json").read_text())["training"]
    eval_cmd = [*spo, "spm", "eval", str(out / "spm"), "--data", str(work / "heldout"), "--base", "toy:sd15",
                "--timesteps", "0,501", "--out", str(work / "eval"), "--no-progress"]
    evaluation = watched(eval_cmd)
    accuracy = json.loads((work / "eval" / "accuracy.json").read_text())
    disk = sum(f.stat().st_size for f in (work / "data").glob("*.parquet"))
    wait = summary["data_wait"]
    train_s = summary["seconds_this_run"]
    return {"data": {**written, "disk_gib": round(disk / 2**30, 3)}, "one_worker": rates,
            "train": {"command": " ".join(train_cmd[1:]), **{k: v for k, v in train.items() if k != "stdout_tail"},
                      "pairs_trained": args.steps * args.batch_size, "pairs_per_s": round(args.steps * args.batch_size
                                                                                          / train_s, 2),
                      "training_seconds": train_s, "data_wait": wait, "skipped_rows": summary["skipped_rows"],
                      "starved": bool(wait["rest_total_s"] > 0.05 * train_s),
                      "final_loss_mean_last_10": summary["final_loss_mean_last_10"]},
            "eval": {"command": " ".join(eval_cmd[1:]), **{k: v for k, v in evaluation.items() if k != "stdout_tail"},
                     "n_pairs": accuracy["n_pairs"], "accuracy": accuracy["models"][0]["accuracy"]},
            "bar": {"peak_rss_le_2gb": max(train["peak_rss_tree_mb"], evaluation["peak_rss_tree_mb"]) <= 2048,
                    "disk_ge_4gb": disk >= 4 * 2**30}}
