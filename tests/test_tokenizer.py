from spo.tokenizer import VOCAB_SIZE, load_clip_tokenizer


def test_offline_clip_tokenizer_matches_clip_ids():
    tok = load_clip_tokenizer()
    assert len(tok) == VOCAB_SIZE
    ids = tok("a small red triangle").input_ids
    # CLIP BPE ids: <|startoftext|>=49406, "a</w>"=320, "red</w>"=736, <|endoftext|>=49407.
    assert ids[0] == 49406 and ids[1] == 320 and ids[3] == 736 and ids[-1] == 49407
    padded = tok("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_sdxl_second_tokenizer_pads_with_bang():
    tok = load_clip_tokenizer("!")
    assert tok.pad_token == "!" and tok.pad_token_id == 0


def test_over_long_prompt_truncates_to_77():
    tok = load_clip_tokenizer()
    ids = tok("word " * 200, truncation=True, max_length=77).input_ids
    assert len(ids) == 77
