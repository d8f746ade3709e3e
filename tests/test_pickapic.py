import io
import json

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spo.data.pickapic import (
    PreferencePair,
    ReadSummary,
    examples_per_prompt,
    read_pairs,
    write_pairs,
)
from spo.errors import SpoInputError


def _img(color, fmt="PNG", size=(8, 6), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


PNG_RED = _img((255, 0, 0))
JPEG_BLUE = _img((0, 0, 255), fmt="JPEG")
PNG_GRAY_LA = _img((128, 200), mode="LA")


def _row(caption="a cat", l0=1.0, l1=0.0, im0=PNG_RED, im1=JPEG_BLUE, **ids):
    return {"caption": caption, "jpg_0": im0, "jpg_1": im1, "label_0": l0, "label_1": l1, **ids}


def test_round_trip_parquet(tmp_path):
    rows = [
        _row("a cat", 1.0, 0.0, are_different=True, image_0_uid="u0", image_1_uid="u1", user_id=7, ranking_id=3),
        _row("a dog", 0.0, 1.0, im0=PNG_GRAY_LA, are_different=True, image_0_uid="u2", image_1_uid="u3", user_id=8, ranking_id=4),
        _row("a cat", 0.5, 0.5, are_different=False, image_0_uid="u4", image_1_uid="u5", user_id=9, ranking_id=5),
    ]
    out = tmp_path / "sub" / "pairs.parquet"
    write_pairs(out, rows)
    assert out.is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind
    schema = pq.read_schema(out)
    assert schema.field("jpg_0").type == pa.binary() and schema.field("label_0").type == pa.float64()

    pairs, summary = read_pairs(out)
    assert [p.caption for p in pairs] == ["a cat", "a dog", "a cat"]
    assert [(p.label_0, p.label_1) for p in pairs] == [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]
    assert [p.preferred for p in pairs] == [0, 1, None]
    assert [p.row for p in pairs] == [0, 1, 2] and all(p.source == str(out) for p in pairs)
    assert pairs[0].ids == {"are_different": True, "image_0_uid": "u0", "image_1_uid": "u1", "user_id": 7, "ranking_id": 3}
    assert pairs[0].image_0 == PNG_RED
    assert summary.rows_read == 3 and summary.pairs_kept == 3 and summary.ties == 1 and summary.rows_skipped == 0
    assert "kept 3" in summary.describe() and "skipped none" in summary.describe()

    a, b = pairs[1].decode()
    assert a.mode == "RGB" and b.mode == "RGB" and a.size == (8, 6)
    assert a.getpixel((0, 0)) == (128, 128, 128)
    assert b.getpixel((0, 0))[2] > 200

    # PreferencePair objects can be written back too.
    write_pairs(tmp_path / "again.parquet", pairs)
    again, _ = read_pairs(tmp_path / "again.parquet")
    assert [(p.caption, p.label_0, p.image_1, p.ids) for p in again] == [(p.caption, p.label_0, p.image_1, p.ids) for p in pairs]


def test_minimal_columns_and_examples_per_prompt(tmp_path):
    write_pairs(tmp_path / "p.parquet", [_row("x"), _row("y"), _row("x"), _row("x")])
    pairs, _ = read_pairs([str(tmp_path / "p.parquet")])
    assert pairs[0].ids == {}
    assert examples_per_prompt(pairs) == pytest.approx([1 / 3, 1.0, 1 / 3, 1 / 3])
    assert examples_per_prompt([]) == []


def test_directory_recursive_sorted(tmp_path):
    write_pairs(tmp_path / "b" / "2.parquet", [_row("third")])
    write_pairs(tmp_path / "a" / "1.parquet", [_row("first"), _row("second")])
    (tmp_path / "notes.txt").write_text("ignored")
    pairs, summary = read_pairs(tmp_path)
    assert [p.caption for p in pairs] == ["first", "second", "third"]
    assert len(summary.files) == 2


def _write_arrow_stream(path, rows):
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)


def test_save_to_disk_folder(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    _write_arrow_stream(ds / "data-00001-of-00002.arrow", [_row("c")])
    _write_arrow_stream(ds / "data-00000-of-00002.arrow", [_row("a"), _row("b", 0.5, 0.5), _row("bad", 0.7, 0.7)])
    (ds / "dataset_info.json").write_text("{}")
    (ds / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]})
    )
    pairs, summary = read_pairs(ds)
    assert [p.caption for p in pairs] == ["a", "b", "c"]
    assert summary.ties == 1 and summary.skipped == {"bad labels": 1}
    assert summary.bad_rows[0].row == 2 and summary.bad_rows[0].file.endswith("data-00000-of-00002.arrow")

    # Without state.json the .arrow files are read in sorted order.
    (ds / "state.json").unlink()
    pairs, _ = read_pairs(ds)
    assert [p.caption for p in pairs] == ["a", "b", "c"]

    # A parent folder of save_to_disk splits is found too.
    pairs, _ = read_pairs(tmp_path)
    assert len(pairs) == 3


def test_datasets_image_struct_column(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    row = _row("s", im0={"bytes": PNG_RED, "path": None}, im1={"bytes": JPEG_BLUE, "path": None})
    _write_arrow_stream(ds / "data.arrow", [row])
    (ds / "dataset_info.json").write_text("{}")
    pairs, _ = read_pairs(ds)
    assert pairs[0].image_0 == PNG_RED and pairs[0].image_1 == JPEG_BLUE


BAD_ROWS = [
    ("empty caption", _row("   ")),
    ("empty caption", _row(None)),
    ("missing image", _row(im0=None)),
    ("missing image", _row(im1=b"")),
    ("undecodable image", _row(im0=b"not an image at all")),
    ("undecodable image", _row(im1=PNG_RED[:40])),  # truncated PNG
    ("bad labels", _row(l0=0.6, l1=0.6)),
    ("bad labels", _row(l0=1.5, l1=-0.5)),
    ("bad labels", _row(l0=None, l1=1.0)),
    ("bad labels", _row(l0=float("nan"), l1=0.0)),
]


def test_bad_rows_skipped_and_counted(tmp_path):
    f = tmp_path / "mixed.parquet"
    rows = [_row("good 0")] + [r for _, r in BAD_ROWS] + [_row("good 1", 0.9995, 0.0)]
    write_pairs(f, rows)
    pairs, summary = read_pairs(f)
    assert [p.caption for p in pairs] == ["good 0", "good 1"]  # within 1e-3 of summing to 1
    assert pairs[1].label_0 == 0.9995  # kept as given, never renormalised
    assert summary.rows_read == len(rows)
    assert summary.skipped == {"empty caption": 2, "missing image": 2, "undecodable image": 2, "bad labels": 4}
    assert [b.row for b in summary.bad_rows] == list(range(1, 1 + len(BAD_ROWS)))
    assert [b.reason for b in summary.bad_rows] == [r for r, _ in BAD_ROWS]
    text = summary.describe()
    assert "skipped 10" in text and "4 bad labels" in text and f"{f} row 1" in text and "\n" not in text


@pytest.mark.parametrize("reason,row", BAD_ROWS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD_ROWS)])
def test_bad_row_raises_without_skip(tmp_path, reason, row):
    f = tmp_path / "bad.parquet"
    write_pairs(f, [_row("ok"), row])
    with pytest.raises(SpoInputError) as exc:
        read_pairs(f, skip_bad=False)
    msg = str(exc.value)
    assert str(f) in msg and "row 1" in msg and "\n" not in msg


def test_missing_columns_always_error(tmp_path):
    f = tmp_path / "nolabels.parquet"
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [PNG_RED], "jpg_1": [PNG_RED]}), f)
    for skip in (True, False):
        with pytest.raises(SpoInputError, match=r"nolabels\.parquet.*label_0, label_1"):
            read_pairs(f, skip_bad=skip)

    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "state.json").write_text("{}")
    _write_arrow_stream(ds / "data.arrow", [{"caption": "a", "label_0": 1.0, "label_1": 0.0}])
    with pytest.raises(SpoInputError, match=r"data\.arrow.*jpg_0, jpg_1"):
        read_pairs(ds)


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(SpoInputError, match="does not exist"):
        read_pairs(tmp_path / "nope.parquet")
    with pytest.raises(SpoInputError, match="no .parquet files"):
        read_pairs(tmp_path)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet")
    with pytest.raises(SpoInputError, match="junk.parquet"):
        read_pairs(junk)
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "gone.arrow"}]}))
    with pytest.raises(SpoInputError, match="gone.arrow"):
        read_pairs(ds)
    with pytest.raises(SpoInputError):
        read_pairs([])


def test_write_pairs_rejects_incomplete_rows_and_keeps_old_file(tmp_path):
    f = tmp_path / "p.parquet"
    write_pairs(f, [_row("old")])
    bad = _row("new")
    del bad["label_1"]
    with pytest.raises(SpoInputError, match="label_1"):
        write_pairs(f, [bad])
    pairs, _ = read_pairs(f)
    assert [p.caption for p in pairs] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet"]


def test_decode_error_names_row():
    pair = PreferencePair("c", b"junk", PNG_RED, 1.0, 0.0, "src.parquet", 5)
    with pytest.raises(SpoInputError, match="src.parquet row 5"):
        pair.decode()


def test_empty_summary_describe():
    assert ReadSummary().describe().startswith("Read 0 rows from 0 files")
