"""How the shipped CLIP BPE files (spo/assets/clip_tokenizer) were made: from the merge list in open_clip's wheel
(`open_clip/bpe_simple_vocab_16e6.txt.gz`), with `spo toy tokenizer --from-open-clip-wheel WHEEL`."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

from spo.errors import SpoInputError
from spo.tokenizer import ASSET_DIR, VOCAB_SIZE


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_vocab_files(source: str | Path, out_dir: str | Path = ASSET_DIR) -> Path:
    """Write vocab.json and merges.txt from open_clip's BPE list (the .txt.gz, or the wheel holding it)."""
    from spo.io import write_json, write_text

    source = Path(source)
    if not source.exists():
        raise SpoInputError(f"{source}: no such file")
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    else:
        raw = source.read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + VOCAB_SIZE - 512 - 2]]  # 512 byte tokens, 2 specials
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE:
        raise SpoInputError(f"{source}: expected {VOCAB_SIZE} tokens, built {len(tokens)}")
    out_dir = Path(out_dir)
    write_json(out_dir / "vocab.json", {t: i for i, t in enumerate(tokens)})
    write_text(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out_dir
