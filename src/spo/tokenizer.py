"""The offline CLIP BPE tokenizer, shipped with the package.

SD1.5 and SDXL use OpenAI's CLIP BPE (49,408 tokens). The hub is unreachable here, so the package ships
`vocab.json` + `merges.txt` built from the BPE merge list that open_clip's wheel carries
(`open_clip/bpe_simple_vocab_16e6.txt.gz`); transformers' `CLIPTokenizer` reads them directly.
The shipped files were made by `spo toy tokenizer --from-open-clip-wheel WHEEL`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

ASSET_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"
VOCAB_SIZE = 49408
MAX_LENGTH = 77


@lru_cache(maxsize=4)
def load_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A transformers CLIPTokenizer from the shipped files.

    SD1.5 and SDXL's first encoder pad with <|endoftext|>; SDXL's OpenCLIP-G encoder pads with "!".
    """
    from transformers import CLIPTokenizer

    # from_pretrained on the shipped folder reads vocab.json + merges.txt the same way in transformers 4 and 5.
    return CLIPTokenizer.from_pretrained(str(ASSET_DIR), pad_token=pad_token, model_max_length=MAX_LENGTH)
