"""Model sources: a name that stands for a whole world, not a file (today: `toy:sd15`, `toy:sdxl`).

A source brings what a user's checkpoint cannot: its pipeline, its own training and held-out prompts, a default
preference model, a clean-image reference scorer, preference pairs made from the model, and a before/after
evaluation. The trainers, `spo generate`, `spo spm ...` and the rest ask this registry; nothing outside it and
the plugin's own package knows that the toy world exists. A plugin is a module with a `SOURCES` list of
ModelSource and, optionally, `COMMANDS` (CLI command name -> module with add_arguments/run, e.g. `spo toy`);
the built-in one is the embedded toy world (spo.toy.source).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from spo.errors import SpoInputError

# Modules holding built-in sources, imported the first time a name is looked up.
PLUGINS: tuple[str, ...] = ("spo.toy.source",)
DEFAULT_SOURCE = "toy:sd15"  # what a command uses when no model is given


@dataclass(frozen=True)
class ModelSource:
    name: str  # "toy:sd15"
    family: str  # "sd15" | "sdxl"
    load_pipeline: Callable[[], Any]
    training_prompts: Callable[[int], list[str]]  # seed -> the training prompts, in the source's order for that seed
    heldout_prompts: Callable[[int, int], list[str]]  # (n, seed) -> held-out prompts
    preference: str = ""  # default preference model (an SPM folder or module:function)
    reference: str = ""  # default clean-image reference scorer (module:function or a folder)
    references: tuple[str, ...] = ()  # further references reported beside it
    make_pairs: Callable[..., list[dict]] | None = None  # (pipe, n, seed) -> Pick-a-Pic-schema rows
    evaluate: Callable[..., dict] | None = None  # (lora, n, seed, out) -> {"text": ..., ...}
    spm_init: Callable[..., Any] | None = None  # (time_conditioning) -> a fresh SPM for `spo spm train --init <name>`
    report_pairs: int = 0  # before/after pairs the HTML report shows by default
    prompt_warning: Callable[[str], str | None] | None = None  # prompt -> why the model cannot read it, or None
    # The world's exact judge: (PIL images, prompts) -> {"aesthetic": [...], "alignment": [...]} (`spo score --judge`).
    judge: Callable[[list, list[str]], dict[str, list[float]]] | None = None
    # (pairs, judged, preferred, aligned) -> how the world's rater agrees with the judge (`spo spm eval --against judge`)
    rater_references: Callable[..., dict] | None = None
    config_dir: Path | None = None  # a diffusers folder whose configs fit single files and LoRAs of this model's size
    extras: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelSource] = {}
_COMMANDS: dict[str, str] = {}  # plugin CLI commands: name -> module with add_arguments(parser) and run(args)
_loaded = False


def register(source: ModelSource) -> None:
    _REGISTRY[source.name] = source


def _load_plugins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in PLUGINS:
            plugin = importlib.import_module(module)
            for source in plugin.SOURCES:
                register(source)
            _COMMANDS.update(getattr(plugin, "COMMANDS", {}))


def names() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def looks_like_source(name) -> bool:
    """True for a `scheme:name` string that is not a path (a Windows drive letter is one character)."""
    text = str(name) if name is not None else ""
    scheme, sep, rest = text.partition(":")
    return bool(sep) and len(scheme) > 1 and "/" not in scheme and "\\" not in scheme and not rest.startswith(("/", "\\"))


def get(name) -> ModelSource | None:
    """The source named `name`, None for a path; an unknown `scheme:name` is refused with the known names."""
    if name is None or not looks_like_source(name):
        return None
    _load_plugins()
    if str(name) not in _REGISTRY:
        raise SpoInputError(f"unknown model {name!r} (built in: {', '.join(sorted(_REGISTRY))}; "
                            "or give a diffusers folder or a single-file checkpoint)")
    return _REGISTRY[str(name)]


def all_sources() -> list[ModelSource]:
    _load_plugins()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def default(family: str | None = None) -> ModelSource:
    """The default source (DEFAULT_SOURCE), or the first registered one of `family`."""
    _load_plugins()
    if family is None or _REGISTRY[DEFAULT_SOURCE].family == family:
        return _REGISTRY[DEFAULT_SOURCE]
    for source in all_sources():
        if source.family == family:
            return source
    raise SpoInputError(f"no built-in model of family {family!r}")


def preference_spec(spec):
    """A preference model as given, except that a source name stands for that source's default preference model.
    (Only registered names count: "package.module:function" has the same shape.)"""
    _load_plugins()
    source = _REGISTRY.get(str(spec))
    return spec if source is None else source.preference


def command(name: str):
    """The module of plugin CLI command `name` (it defines add_arguments(parser) and run(args))."""
    _load_plugins()
    return importlib.import_module(_COMMANDS[name])
