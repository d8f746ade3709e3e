"""The `spo` command: one parser, subcommands registered by their modules.

Each command module exposes `register(subparsers)`; the module is imported only when its command runs,
so `spo --help` stays fast (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from spo.errors import SpoInputError

# command name -> (module, one-line help). Modules define `add_arguments(parser)` and `run(args)`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("spo.cli.train_cmd", "post-train a model with SPO (no arguments: the SD1.5-family toy default)"),
    "dpo": ("spo.cli.dpo_cmd", "Diffusion-DPO baseline on offline Pick-a-Pic-schema pairs (no arguments: toy default)"),
    "toy": ("spo.cli.toy_cmd", "the embedded toy world: build models, sample, write preference pairs"),
    "export": ("spo.cli.export_cmd", "write a LoRA for A1111/ComfyUI/kohya (webui keys) and diffusers, with metadata"),
    "merge": ("spo.cli.merge_cmd", "merge checkpoints and bake LoRAs from a TOML recipe into one model"),
    "data": ("spo.cli.data_cmd", "inspect Pick-a-Pic-schema preference pairs: counts, skipped rows, sizes, a preview"),
    "spm": ("spo.cli.spm_cmd", "step-aware preference model: train, evaluate, convert official checkpoints"),
    "generate": ("spo.cli.generate_cmd", "make images (txt2img/img2img) with LoRAs at any strength; A1111-style PNG metadata"),
    "sweep": ("spo.cli.sweep_cmd", "side-by-side grids over LoRA strength, denoise, seed, sampler, steps; suggested strengths"),
    "score": ("spo.cli.score_cmd", "score a folder of images (judge, SPM, PickScore...) with CIs; seed-matched win rate"),
    "plan": ("spo.cli.plan_cmd", "before a run: will this `spo train` fit my GPU, how long will it take (no model loaded)"),
    "dev": ("spo.cli.dev_cmd", "for checking spo at full size offline: random-weight stand-ins of real models"),
    "report": ("spo.cli.report_cmd", "one HTML page for a training run or a sweep: before/after, grids, scores, curves"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we want one line and exit code 2.

    Abbreviated flags are off: with dozens of config flags, `--k` silently meaning `--keep-checkpoints`
    (in a command without `--k`) is a trap.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from spo import __version__

    parser = OneLineParser(prog="spo", description="Step-aware Preference Optimization for SD1.5/SDXL-family models.")
    parser.add_argument("--version", action="version", version=f"spo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_module=module_name)
    return parser


# Third-party notices a user cannot act on (they concern how we call the libraries, or optional backends we do
# not use); matched on the message so that every other warning still shows.
QUIET_MESSAGES = (
    r"should be kept in float32: \[\]",  # diffusers, on .to(dtype) of a model with no fp32 modules
    r"No LoRA keys associated to CLIPTextModel",  # diffusers/peft, for UNet-only LoRAs
    r"requires torchvision \(not installed\)",  # transformers falls back to its PIL image processors
    r"`torch_dtype` (attribute )?is deprecated",  # transformers, from diffusers' own loaders
    r"torchvision\.(datapoints|transforms\.v2|tv_tensors).*[Bb]eta",  # torchvision's beta-namespace notice
)


class _DropMessages:
    """A logging filter dropping records whose message matches one of QUIET_MESSAGES."""

    def __init__(self, pattern):
        self.pattern = pattern

    def filter(self, record) -> bool:
        try:
            return not self.pattern.search(record.getMessage())
        except Exception:  # noqa: BLE001 - a badly formatted record is the library's to show
            return True


# The modules whose loggers say them (a filter on a logger sees the records logged on it; these are created now
# and picked up by the libraries when they import, so nothing heavy is imported for this).
QUIET_LOGGERS = ("diffusers.models.modeling_utils", "diffusers.loaders.peft", "diffusers.loaders.lora_base",
                 "diffusers.loaders.lora_pipeline", "transformers.utils.import_utils",
                 "transformers.configuration_utils", "transformers.modeling_utils", "transformers.pipelines",
                 "transformers.pipelines.base")


def quiet_libraries() -> None:
    """Silence the third-party notices in QUIET_MESSAGES (every other warning still shows); called once before a
    command runs."""
    import logging
    import re
    import warnings

    pattern = re.compile("|".join(QUIET_MESSAGES))
    for message in QUIET_MESSAGES:
        warnings.filterwarnings("ignore", message=f".*{message}")
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(pattern))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the module of the command asked for.
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else "__none__")
    if command is not None and command not in COMMANDS:
        parser.error(f"unknown command {command!r} (choose from {', '.join(COMMANDS)})")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from spo.host_memory import fix_mmap_threshold

    fix_mmap_threshold()  # before any model is loaded: freed tensors go back to the OS (see spo/host_memory.py)
    module = importlib.import_module(args._module)
    quiet_libraries()
    try:
        result = module.run(args)
    except SpoInputError as exc:
        print(f"spo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spo {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
