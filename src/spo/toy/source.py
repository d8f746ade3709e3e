"""The embedded toy world as a model source (`toy:sd15`, `toy:sdxl`): registered with spo.sources."""

from __future__ import annotations

import random
from functools import partial

from spo.sources import ModelSource


def _pipeline(family: str):
    from spo.toy.sampling import load_toy_pipeline

    return load_toy_pipeline(family)


def _training_prompts(seed: int) -> list[str]:
    from spo.toy.world import prompts

    out = prompts("train")
    random.Random(seed).shuffle(out)  # the toy list is ordered by shape; a prefix should be a mixed subset
    return out


def _heldout_prompts(n: int, seed: int) -> list[str]:
    from spo.toy.world import sample_scenes

    return [s.caption for s in sample_scenes(n, seed=seed, split="heldout")]


def _make_pairs(pipe, n: int, seed: int) -> list[dict]:
    from spo.toy.pairs import make_pair_rows

    return make_pair_rows(pipe, n, seed=seed, split="train")


def _evaluate(name: str, lora, n: int, seed: int, out=None) -> dict:
    from spo.toy.evaluate import before_after

    return before_after(name, lora, n=n, seed=seed, out=out)


def _prompt_warning(prompt: str) -> str | None:
    from spo.toy.world import parse_caption

    if parse_caption(prompt) is not None:
        return None
    return (f"{prompt!r} is outside the toy grammar, so the toy model cannot read it (expect noise); toy captions look "
            "like 'a large red circle on a white background, in the center'")


def _rater_references(pairs, judged, preferred, aligned=None) -> dict:
    from spo.toy.pairs import rater_references

    return rater_references(pairs, judged, preferred, aligned)


def _judge_columns(images, prompts) -> dict[str, list[float]]:
    from spo.toy.judge import columns

    return columns(images, prompts)


def _spm_init(time_conditioning: bool = True):
    from spo.spm.model import StepAwarePreferenceModel

    return StepAwarePreferenceModel.toy(time_conditioning=time_conditioning)


def _source(family: str) -> ModelSource:
    from spo.toy.defaults import TOY_MODEL_DIR, TOY_SPM_DIR

    name = f"toy:{family}"
    return ModelSource(name=name, family=family, load_pipeline=partial(_pipeline, family),
                       training_prompts=_training_prompts, heldout_prompts=_heldout_prompts,
                       preference=str(TOY_SPM_DIR / family), reference="spo.toy.judge:aesthetic_preference",
                       references=("spo.toy.judge:alignment_preference",), make_pairs=_make_pairs,
                       evaluate=partial(_evaluate, name), spm_init=_spm_init, report_pairs=8,
                       prompt_warning=_prompt_warning, judge=_judge_columns, rater_references=_rater_references,
                       config_dir=TOY_MODEL_DIR / family)


SOURCES = [_source("sd15"), _source("sdxl")]
COMMANDS = {"toy": "spo.toy.cli"}
