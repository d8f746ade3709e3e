"""spo.data.stream and the SPM trainer's batches on real parquet / Arrow files: the index reads no image, the
order is the in-memory one when the set fits the buffer and a bounded block shuffle when not, DataLoader workers
and processes see the very batches one plain process sees, bad rows are counted where they are met."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from spo.data.pickapic import read_pairs, write_pairs
from spo.data.stream import BlockOrder, Filters, build_index, iter_pairs
from spo.errors import SpoInputError
from spo.train.pair_batches import Layout, MemoryBatches, StreamBatches, loader, stream_indices, train_batches


def _jpeg(seed: int, side: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _rows(n: int, start: int = 0, **extra):
    return [{"caption": f"prompt {(start + i) % 7}", "jpg_0": _jpeg(2 * (start + i)), "jpg_1": _jpeg(2 * (start + i) + 1),
             "label_0": [1.0, 0.0, 0.5][(start + i) % 3], "label_1": [0.0, 1.0, 0.5][(start + i) % 3], **extra}
            for i in range(n)]


@pytest.fixture()
def shards(tmp_path):
    """A hub-cache layout: data/train-0000N-of-00003.parquet, row groups of 4 rows."""
    for s in range(3):
        write_pairs(tmp_path / "data" / f"train-{s:05d}-of-00003.parquet", _rows(10, 10 * s), rows_per_group=4)
    return tmp_path


def test_small_set_index_equals_read_pairs_and_order_equals_in_memory(shards):
    index = build_index(shards)
    pairs, summary = read_pairs(shards)
    assert index.images_checked and len(index) == len(pairs) == 30
    assert [index.caption(i) for i in range(30)] == [p.caption for p in pairs]
    assert index.summary.describe() == summary.describe()
    assert list(index.weights()) == pytest.approx([1 / sum(q.caption == p.caption for q in pairs) for p in pairs])
    order = BlockOrder(index, seed=3)
    assert list(order.rows(0, 75)) == stream_indices(30, 3, 0, 75)
    assert [(r, p.caption, p.image_0) for r, p in iter_pairs(index)] == [(i, p.caption, p.image_0)
                                                                         for i, p in enumerate(pairs)]


def test_block_order_is_a_bounded_seeded_permutation_of_each_epoch(shards):
    index = build_index(shards, buffer_bytes=2000)
    unit_bytes = [u.nbytes for u in index.units]
    assert not index.images_checked and len(index.units) == 9 and min(unit_bytes) > 0
    budget = 3 * max(unit_bytes)
    order = BlockOrder(index, seed=3, buffer_bytes=budget)
    for e in range(3):
        rows, bounds = order.epoch(e)
        assert sorted(rows) == list(range(30))  # every row once per epoch
        assert len(bounds) > 2  # more than one window
        for w in range(len(bounds) - 1):
            units = {int(index.unit[r]) for r in rows[bounds[w]:bounds[w + 1]]}
            assert sum(unit_bytes[u] for u in units) <= budget  # a window is read whole: it fits the buffer
            # and holds its units entirely: each is read once per epoch
            assert bounds[w + 1] - bounds[w] == sum(int((index.unit == u).sum()) for u in units)
    assert not np.array_equal(order.epoch(0)[0], order.epoch(1)[0])
    again = BlockOrder(build_index(shards, buffer_bytes=2000), seed=3, buffer_bytes=budget)
    assert np.array_equal(again.rows(5, 50), order.rows(5, 50))
    assert not np.array_equal(BlockOrder(index, seed=4, buffer_bytes=budget).rows(0, 30), order.rows(0, 30))


def _batches(index, layout, budget, total=12):
    labels = (index.label_0, index.label_1)
    return train_batches(index, labels, 3, layout, 8, total, budget)


def _same(a: dict, b: dict):
    assert a["rows"] == b["rows"] and a["prompts"] == b["prompts"]
    for k in ("img0", "img1", "label_0", "label_1", "weight"):
        assert torch.equal(a[k], b[k]), k


def test_workers_processes_and_resume_see_the_same_batches(shards):
    index = build_index(shards, buffer_bytes=2000)
    budget = 3 * max(u.nbytes for u in index.units)
    plain = list(loader(_batches(index, Layout(4), budget), 0, 0))
    assert [b["m"] for b in plain] == list(range(12)) and all(len(b["rows"]) == 4 for b in plain)
    assert [r for b in plain for r in b["rows"]] == list(BlockOrder(index, 3, budget).rows(0, 48))
    workers = list(loader(_batches(index, Layout(4), budget), 0, 2))
    for a, b in zip(plain, workers):
        _same(a, b)
    resumed = list(loader(_batches(index, Layout(4), budget), 7, 2))  # a resume at batch 7
    assert [b["m"] for b in resumed] == list(range(7, 12))
    for a, b in zip(plain[7:], resumed):
        _same(a, b)
    # 2 processes x 2 pairs: process r's share of batch m is pairs 2r..2r+1 of the one-process batch m of 4
    ranks = [list(loader(_batches(index, Layout(2, 2, r), budget), 0, 1)) for r in (0, 1)]
    for m, whole in enumerate(plain):
        assert ranks[0][m]["rows"] + ranks[1][m]["rows"] == whole["rows"]
        assert torch.equal(torch.cat([ranks[0][m]["img0"], ranks[1][m]["img0"]]), whole["img0"])


def test_a_reader_holds_only_its_window_share(shards):
    index = build_index(shards, buffer_bytes=2000)
    budget = 3 * max(u.nbytes for u in index.units)
    held = []
    for r in (0, 1):
        ds = _batches(index, Layout(2, 2, r), budget)
        for m in range(len(ds)):
            ds[m]
            held.append(len(ds._held))
    # one window (at most 12 rows) halved between the two processes, and of the window before only the rows of a
    # batch that straddles the two (2 rows)
    assert max(held) <= 6 + 2 and min(held) >= 1


def test_memory_batches_equal_stream_batches_on_a_small_set(shards):
    index = build_index(shards)
    pairs, _ = read_pairs(shards)
    labels = ([p.label_0 for p in pairs], [p.label_1 for p in pairs])
    mem = train_batches(pairs, labels, 3, Layout(4), 8, 12, 1 << 20)
    stream = _batches(index, Layout(4), 1 << 20)
    assert isinstance(mem, MemoryBatches) and isinstance(stream, StreamBatches)
    for m in range(12):
        _same(mem[m], stream[m])


def test_bad_images_counted_when_read_on_a_large_set(tmp_path):
    rows = _rows(8)
    rows[2]["jpg_0"] = b"not an image"
    rows[5]["jpg_1"] = None
    write_pairs(tmp_path / "p.parquet", rows, rows_per_group=2)
    small = build_index(tmp_path)  # fits the buffer: checked at once, as read_pairs does
    assert len(small) == 6 and small.summary.skipped == {"undecodable image": 1, "missing image": 1}
    large = build_index(tmp_path, buffer_bytes=100)  # does not: checked when read
    assert len(large) == 8 and large.summary.rows_skipped == 0
    assert [r for r, _ in iter_pairs(large)] == [0, 1, 3, 4, 6, 7]
    assert large.summary.skipped == {"undecodable image": 1, "missing image": 1}
    batch = _batches(build_index(tmp_path, buffer_bytes=100), Layout(8), 100, total=1)[0]
    assert len(batch["rows"]) == 6 and sorted(reason for reason, _ in batch["skipped"]) == ["missing image",
                                                                                          "undecodable image"]
    assert all("p.parquet row" in text for _, text in batch["skipped"])


def test_filters_and_v2_columns_and_held_out_splits(tmp_path):
    rows = _rows(6)
    for i, r in enumerate(rows):
        r.update(are_different=i != 1, has_label=i != 4, best_image_uid=f"u{i}", model_0="m0", model_1="m1")
    write_pairs(tmp_path / "data" / "train-00000-of-00001.parquet", rows)
    write_pairs(tmp_path / "data" / "validation_unique-00000-of-00001.parquet", _rows(2, 100))
    index = build_index(tmp_path / "data" / "train-00000-of-00001.parquet",
                        Filters(drop_ties=True, drop_same=True, drop_unlabelled=True))
    # rows 2 and 5 are ties, 1 is not different, 4 has no label
    assert len(index) == 2 and index.summary.filtered == {"ties": 2, "are_different=False": 1, "has_label=False": 1}
    assert "left out" in index.summary.describe()
    (_, first), = list(iter_pairs(index, np.array([0])))
    assert first.ids["best_image_uid"] == "u0" and first.ids["model_1"] == "m1" and first.ids["has_label"] is True
    held_out = build_index(tmp_path / "data" / "validation_unique-00000-of-00001.parquet")
    assert [held_out.caption(i) for i in range(2)] == ["prompt 2", "prompt 3"]


def test_save_to_disk_folder_streams(tmp_path):
    import pyarrow.ipc as ipc

    ds = tmp_path / "ds"
    ds.mkdir()
    table = pa.Table.from_pylist(_rows(6))
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink, ipc.new_stream(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=2):
            w.write_batch(batch)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    index = build_index(ds, buffer_bytes=10)
    assert len(index.units) == 3 and all(u.kind == "arrow" and u.nbytes > 0 for u in index.units)
    pairs, _ = read_pairs(ds)
    assert [p.image_1 for _, p in iter_pairs(index)] == [p.image_1 for p in pairs]


def test_bad_files_same_errors_as_read_pairs(tmp_path):
    nolabels = tmp_path / "nolabels.parquet"
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"]}), nolabels)
    truncated = tmp_path / "cut.parquet"
    write_pairs(truncated, _rows(4))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (tmp_path / "empty").mkdir()
    for bad in (nolabels, truncated, tmp_path / "empty", tmp_path / "missing.parquet"):
        with pytest.raises(SpoInputError) as streamed:
            build_index(bad)
        with pytest.raises(SpoInputError) as in_memory:
            read_pairs(bad)
        assert str(streamed.value) == str(in_memory.value) and "\n" not in str(streamed.value)


def test_spo_data_inspect_through_the_command(tmp_path):
    import subprocess
    import sys

    rows = _rows(20)
    for i, r in enumerate(rows):
        r.update(are_different=i != 3, has_label=i not in (7, 8))
    rows[5]["jpg_0"] = b"bad"
    rows[6]["label_0"] = 0.9  # 0.9 + 0.0: bad labels
    write_pairs(tmp_path / "data" / "train-00000-of-00002.parquet", rows[:10], rows_per_group=3)
    write_pairs(tmp_path / "data" / "train-00001-of-00002.parquet", rows[10:], rows_per_group=3)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "spo", "data", "inspect", str(tmp_path / "data"), "--sample", "6",
                        "--preview", "3", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "inspect.json").read_text())
    assert result["rows"] == 20 and result["pairs_kept"] == 18 and result["units"] == 8
    assert result["skipped"] == {"undecodable image": 1, "bad labels": 1}
    # ties among the kept rows: rows 2, 8, 11, 14, 17 (row 5, a tie too, was skipped)
    assert result["ties"] == 5 and result["would_filter"] == {"ties": 5, "are_different=False": 1,
                                                              "has_label=False": 2}
    assert result["sample"]["rows"] == 6 and result["sample"]["formats"] == {"JPEG": 12}
    assert result["sample"]["width"]["max"] == 16 and result["caption_words"]["median"] == 2
    assert "skipped 2" in r.stdout and "would leave out" in r.stdout
    preview = Image.open(out / "preview.png")
    assert preview.format == "PNG" and preview.height > 3 * 128
    bad = subprocess.run([sys.executable, "-m", "spo", "data", "inspect", str(tmp_path / "none")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "does not exist" in bad.stderr


def test_a_folder_of_several_hub_splits_asks_for_one(tmp_path):
    for split in ("train", "test_unique"):
        write_pairs(tmp_path / "data" / f"{split}-00000-of-00001.parquet", _rows(2))
    for read in (build_index, read_pairs):
        with pytest.raises(SpoInputError, match=r"holds the splits test_unique, train: name the one to read, e.g. .*/train-\*.parquet"):
            read(tmp_path / "data")
    assert len(build_index(sorted((tmp_path / "data").glob("train-*.parquet")))) == 2


def test_the_vectorised_index_judges_rows_as_read_pairs_does(tmp_path):
    from test_pickapic import BAD_ROWS, _row

    rows = [_row("good 0")] + [r for _, r in BAD_ROWS] + [_row("\x1f"), _row("good 1", 0.9995, 0.0), _row("tie", 0.5, 0.5)]
    write_pairs(tmp_path / "mixed.parquet", rows, rows_per_group=3)
    # integer labels and a label column of strings (every row then judged one by one)
    pq.write_table(pa.table({"caption": ["int", "int"], "jpg_0": [rows[0]["jpg_0"]] * 2, "jpg_1": [rows[0]["jpg_1"]] * 2,
                             "label_0": [1, 0], "label_1": [0, 1]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"caption": ["str"], "jpg_0": [rows[0]["jpg_0"]], "jpg_1": [rows[0]["jpg_1"]],
                             "label_0": ["1.0"], "label_1": ["0.0"]}), tmp_path / "strs.parquet")
    for big in (False, True):  # images checked at once, or (no image checked here) only the text checks
        index = build_index(tmp_path, buffer_bytes=10 if big else 1 << 20)
        pairs, summary = read_pairs(tmp_path)
        text_bad = [b for b in summary.bad_rows if b.reason in ("bad labels", "empty caption")]
        assert [str(b) for b in index.summary.bad_rows if not big or b.reason in ("bad labels", "empty caption")] == \
            [str(b) for b in (text_bad if big else summary.bad_rows)]
        if not big:
            assert [index.caption(i) for i in range(len(index))] == [p.caption for p in pairs]
            assert list(index.label_0) == [p.label_0 for p in pairs] and index.summary.describe() == summary.describe()
