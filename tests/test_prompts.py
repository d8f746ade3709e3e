import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spo.data.prompts import clean_prompt, load_prompts
from spo.errors import SpoInputError

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spo_4k_training_prompts.json"


def test_clean_prompt():
    assert clean_prompt("  a   cat\tin\n a hat  ") == "a cat in a hat"
    assert clean_prompt("a\x00b\x1b[0mc\u200bd\x7f") == "ab[0mcd"
    assert clean_prompt("café — 猫") == "café — 猫"
    assert clean_prompt("\r\n\t ") == ""
    with pytest.raises(SpoInputError):
        clean_prompt(3)


def test_json_strings_and_objects(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([" one ", "", "two\n", None, "   "]))
    p = load_prompts(f)
    assert p == ["one", "two"] and p.dropped == 3

    f.write_text(json.dumps([{"caption": "a", "trainset_idx": 1}, {"prompt": "b"}, {"caption": " "}]))
    p = load_prompts(f)
    assert p == ["a", "b"] and p.dropped == 1

    f.write_text(json.dumps([{"text": "x", "id": 1}]))
    assert load_prompts(f, column="text") == ["x"]
    with pytest.raises(SpoInputError, match="'caption' or 'prompt'"):
        load_prompts(f)
    with pytest.raises(SpoInputError, match="no column 'nope'"):
        load_prompts(f, column="nope")


def test_jsonl(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n"b"\n')
    assert load_prompts(f) == ["a", "b"]


def test_txt(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\ufefffirst\n\n  second  \r\n\t\nthird")
    p = load_prompts(f)
    assert p == ["first", "second", "third"] and p.dropped == 2


def test_csv(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('id,caption\n1,"a, b"\n2,\n3,"multi\nline"\n')
    p = load_prompts(f)
    assert p == ["a, b", "multi line"] and p.dropped == 1
    assert load_prompts(f, column="id") == ["1", "2", "3"]

    amb = tmp_path / "amb.csv"
    amb.write_text("caption,prompt\na,b\n")
    with pytest.raises(SpoInputError, match="both"):
        load_prompts(amb)
    assert load_prompts(amb, column="prompt") == ["b"]

    other = tmp_path / "other.csv"
    other.write_text("x,y\n1,2\n")
    with pytest.raises(SpoInputError, match="name the column"):
        load_prompts(other)
    single = tmp_path / "single.csv"
    single.write_text("text\nhello\n")
    assert load_prompts(single) == ["hello"]


def test_parquet(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": ["a", None, " b "], "n": [1, 2, 3]}), f)
    p = load_prompts(f)
    assert p == ["a", "b"] and p.dropped == 1
    with pytest.raises(SpoInputError, match="not strings"):
        load_prompts(f, column="n")
    with pytest.raises(SpoInputError, match="no column 'x'"):
        load_prompts(f, column="x")


def test_errors(tmp_path):
    with pytest.raises(SpoInputError, match="does not exist"):
        load_prompts(tmp_path / "missing.json")
    (tmp_path / "p.yaml").write_text("- a\n")
    with pytest.raises(SpoInputError, match="unknown extension"):
        load_prompts(tmp_path / "p.yaml")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(SpoInputError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(SpoInputError, match="not valid JSON"):
        load_prompts(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(SpoInputError, match="JSON list"):
        load_prompts(tmp_path / "obj.json")
    (tmp_path / "num.json").write_text("[1]")
    with pytest.raises(SpoInputError, match="entry 0"):
        load_prompts(tmp_path / "num.json")
    (tmp_path / "junk.parquet").write_bytes(b"nope")
    with pytest.raises(SpoInputError, match="junk.parquet"):
        load_prompts(tmp_path / "junk.parquet")
    with pytest.raises(SpoInputError, match="directory"):
        load_prompts(tmp_path)


@pytest.mark.skipif(not SHARED_PROMPTS.is_file(), reason="shared 4k prompt file not present")
def test_shared_4k_prompts():
    p = load_prompts(SHARED_PROMPTS)
    assert len(p) == 4000 and p.dropped == 0
    assert all(isinstance(x, str) and x == x.strip() and x for x in p)
