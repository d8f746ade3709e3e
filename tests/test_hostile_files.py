"""Hostile files: pickles that would run code are never executed; forged .safetensors headers (huge lengths and
sizes, overlapping or out-of-range offsets, unknown dtypes, truncation, non-JSON) give one line and exit 2 in
every command that reads a model, LoRA or SPM, without a crash or a big allocation; config and recipe files
with path traversal or unknown keys are refused.

The forged files go through the commands in ONE subprocess (imports cost seconds), which reports each case's
exit code and stderr and its own peak RSS, so "no huge allocation" is measured, not assumed.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # integration: real training runs or subprocess chains

# --------------------------------------------------------------------------------------------- pickles


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appearing would mean code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_file(path: Path, marker: Path) -> Path:
    # A state dict whose value runs code, in both torch.save's zip container and a bare legacy pickle.
    if path.suffix == ".pt":
        with open(path, "wb") as f:
            pickle.dump({"state_dict": {"model.diffusion_model.x": _Payload(marker)}}, f)
    else:
        torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1), "evil": _Payload(marker)}}, path)
    return path


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickle_payloads_are_never_executed(tmp_path, suffix, capsys):
    from spo.cli.main import main
    from spo.errors import SpoInputError
    from spo.models.loading import load_pipeline

    marker = tmp_path / "PWNED"
    evil = _pickle_file(tmp_path / f"model{suffix}", marker)

    with pytest.raises(SpoInputError) as no_flag:  # refused outright without allow_pickle
        load_pipeline(evil)
    assert "pickle" in str(no_flag.value) and "\n" not in str(no_flag.value)
    with pytest.raises(SpoInputError) as weights_only:  # with it, weights_only refuses the payload
        load_pipeline(evil, allow_pickle=True)
    assert "weights-only" in str(weights_only.value) and "\n" not in str(weights_only.value)

    # the SPM official-checkpoint converter, with and without --allow-pickle
    for extra in ([], ["--allow-pickle"]):
        code = main(["spm", "convert", str(evil), "--clip", str(tmp_path / "clip"), "--family", "sd15",
                     "--out", str(tmp_path / "spm"), *extra])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("spo ")]
        assert code == 2 and len(err) == 1 and "pickle" in err[0], err
    assert not (tmp_path / "spm").exists()
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- forged safetensors

def _raw(header, data: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def forged_variants(valid: bytes) -> dict[str, bytes]:
    """Hostile versions of a valid .safetensors file."""
    (n,) = struct.unpack("<Q", valid[:8])
    header, data = json.loads(valid[8:8 + n]), valid[8 + n:]
    k0, k1 = sorted(k for k in header if k != "__metadata__")[:2]

    def mod(fn):
        h = json.loads(json.dumps(header))
        fn(h)
        return _raw(h, data)

    return {
        "huge_header_length": struct.pack("<Q", 2**63 - 1) + valid[8:],
        "header_length_past_end": struct.pack("<Q", 90_000_000) + valid[8:],
        "huge_shape": mod(lambda h: h[k0].update(shape=[2**31, 2**31, 2**20])),
        "huge_offsets": mod(lambda h: h[k0].update(data_offsets=[0, 2**62])),
        "overlapping_offsets": mod(lambda h: h[k1].update(data_offsets=h[k0]["data_offsets"])),
        "offsets_out_of_range": mod(lambda h: h[k0].update(data_offsets=[len(data) + 8, len(data) + 408])),
        "unknown_dtype": mod(lambda h: h[k0].update(dtype="Q99")),
        "truncated_data": valid[: 8 + n + len(data) // 2],
        "non_json_header": _raw(b"{not json       ", data),
        "header_not_object": _raw(b"[1, 2, 3]", data),
        "empty_file": b"",
        "three_bytes": b"abc",
    }


DRIVER = r'''
import contextlib, io, json, resource, sys, traceback
from pathlib import Path
from spo.cli.main import main
from spo.errors import SpoInputError
from spo.models.loading import load_pipeline
from spo.spm.model import StepAwarePreferenceModel

cases = json.loads(Path(sys.argv[1]).read_text())
load_pipeline("toy:sd15")  # warm up: imports and the toy model, so the RSS below is about the hostile files
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = []
for case in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if case["kind"] == "cli":
                code = main(case["argv"])
            else:  # API loaders
                try:
                    (load_pipeline if case["kind"] == "load_pipeline" else StepAwarePreferenceModel.load)(case["path"])
                    code = 0
                except SpoInputError as exc:
                    print(f"spo api: error: {exc}", file=sys.stderr)
                    code = 2
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = "crash"
    results.append({"name": case["name"], "code": code, "stderr": err.getvalue()})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"results": results, "baseline_kib": baseline, "peak_kib": peak}))
'''


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    """A valid toy single-file checkpoint, LoRA and SPM folder to forge from."""
    from spo.formats.single_file import save_single_file
    from spo.models.loading import load_pipeline
    from spo.spm.model import StepAwarePreferenceModel

    d = tmp_path_factory.mktemp("valid")
    save_single_file(load_pipeline("toy:sd15"), d / "model.safetensors")
    sys.path.insert(0, str(Path(__file__).parent))
    from show_helpers import make_lora

    make_lora(d / "lora")
    StepAwarePreferenceModel.toy().save(d / "spm")
    return d


def test_forged_safetensors_one_line_exit_2_small_memory(valid_files, tmp_path):
    model_raw = (valid_files / "model.safetensors").read_bytes()
    lora_raw = (valid_files / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    spm_raw = (valid_files / "spm" / "model.safetensors").read_bytes()
    cases, outputs = [], []
    for name, raw in forged_variants(model_raw).items():
        f = tmp_path / f"model_{name}.safetensors"
        f.write_bytes(raw)
        cases.append({"name": f"load_pipeline/{name}", "kind": "load_pipeline", "path": str(f)})
        recipe = tmp_path / f"recipe_{name}.toml"
        recipe.write_text(f'base = "{f.name}"\noutput = "merged_{name}.safetensors"\n')
        cases.append({"name": f"merge/{name}", "kind": "cli", "argv": ["merge", str(recipe)]})
        outputs.append(tmp_path / f"merged_{name}.safetensors")
    for name, raw in forged_variants(lora_raw).items():
        f = tmp_path / f"lora_{name}.safetensors"
        f.write_bytes(raw)
        out = tmp_path / f"export_{name}"
        cases.append({"name": f"export/{name}", "kind": "cli", "argv": ["export", str(f), "--out", str(out)]})
        outputs.append(out)
        out = tmp_path / f"generate_{name}"
        cases.append({"name": f"generate/{name}", "kind": "cli",
                      "argv": ["generate", "--model", "toy:sd15", "--lora", str(f), "--prompt", "a red circle",
                               "--steps", "2", "--out", str(out)]})
        outputs.append(out)
    for name, raw in forged_variants(spm_raw).items():
        d = tmp_path / f"spm_{name}"
        d.mkdir()
        (d / "spm_config.json").write_bytes((valid_files / "spm" / "spm_config.json").read_bytes())
        (d / "model.safetensors").write_bytes(raw)
        cases.append({"name": f"spm_load/{name}", "kind": "spm", "path": str(d)})
        out = tmp_path / f"score_{name}"
        cases.append({"name": f"score_spm/{name}", "kind": "cli",
                      "argv": ["score", str(valid_files), "--spm", str(d)]})
    (tmp_path / "cases.json").write_text(json.dumps(cases))

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "cases.json")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = []
    for r in report["results"]:
        ours = [ln for ln in r["stderr"].splitlines() if ln.startswith("spo ")]
        if r["code"] != 2 or "Traceback" in r["stderr"] or len(ours) != 1:
            bad.append((r["name"], r["code"], r["stderr"][-600:]))
    assert not bad, bad
    assert len(report["results"]) == len(cases) >= 60
    # Nothing near the forged sizes (exabytes) was allocated: the peak grew by less than 300 MiB.
    assert (report["peak_kib"] - report["baseline_kib"]) < 300 * 1024, report
    assert not [p for p in outputs if p.exists()]


# --------------------------------------------------------------------------------------------- config files

@pytest.mark.parametrize("body,words", [
    ('base = "../outside.safetensors"\noutput = "m.safetensors"\n', ["base", "outside"]),
    ('base = "/etc/passwd"\noutput = "m.safetensors"\n', ["base"]),
    ('base = "m.safetensors"\noutput = "../../escape.safetensors"\n', ["output"]),
    ('base = "m.safetensors"\noutput = "x.safetensors"\n[[lora]]\npath = "../lora.safetensors"\n', ["lora"]),
    ('base = "m.safetensors"\noutput = "x.safetensors"\nevil = 1\n', ["unknown key", "evil"]),
    ('base = "m.safetensors"\noutput = "x.safetensors"\n[[lora]]\npath = "l.safetensors"\nstrenght = 1\n',
     ["unknown key", "strenght"]),
])
def test_recipe_traversal_and_unknown_keys_refused(tmp_path, body, words):
    from spo.errors import SpoInputError
    from spo.merge import load_recipe

    (tmp_path / "sub").mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"")
    for name in ("m.safetensors", "l.safetensors"):
        (tmp_path / "sub" / name).write_bytes(b"")
    recipe = tmp_path / "sub" / "recipe.toml"
    recipe.write_text(body)
    with pytest.raises(SpoInputError) as err:
        load_recipe(recipe)
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value), str(err.value)


@pytest.mark.parametrize("body,word", [('lora_rnak = 4\n', "lora_rnak"), ('[evil]\nx = 1\n', "evil"),
                                       ('learning_rate = "fast"\n', "learning_rate"), ('this is not toml', "TOML")])
def test_training_config_unknown_keys_refused(tmp_path, body, word, capsys):
    from spo.cli.main import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(body)
    code = main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "out")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("spo ")]
    assert code == 2 and len(err) == 1 and word in err[0], err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- output paths

def _make(kind: str, target: Path):
    import socket

    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink_to_device":
        target.symlink_to("/dev/null")
    elif kind == "symlink_to_fifo":
        os.mkfifo(target.with_name("real_fifo"))
        target.symlink_to(target.with_name("real_fifo"))
    elif kind == "directory":
        target.mkdir()
        (target / "kept").write_text("a user's file\n")
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
        return sock
    return None


@pytest.mark.parametrize("kind", ["fifo", "symlink_to_device", "symlink_to_fifo", "directory", "socket"])
def test_file_writers_never_replace_what_is_not_a_regular_file(tmp_path, kind):
    """The atomic rename would put a regular file in the place of a FIFO, socket or device node (or fail on a
    folder); every writer refuses in one line instead, leaves the thing as it was and no temporary behind."""
    from spo import io as sio
    from spo.errors import SpoInputError

    target = tmp_path / "out.safetensors"
    keep = _make(kind, target)
    before = os.lstat(target)
    writers = [lambda: sio.write_bytes(target, b"x"), lambda: sio.write_json(target, {"a": 1}),
               lambda: sio.save_safetensors({"w": torch.zeros(2)}, target)]
    for write in writers:
        with pytest.raises(SpoInputError) as err:
            write()
        assert "\n" not in str(err.value) and str(target) in str(err.value) and "regular file" in str(err.value)
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    if kind == "directory":
        assert (target / "kept").read_text() == "a user's file\n"
    if keep is not None:
        keep.close()


@pytest.mark.parametrize("kind", ["fifo", "symlink_to_device", "regular_file"])
def test_folder_writer_never_moves_aside_what_is_not_a_folder(tmp_path, kind):
    from spo.errors import SpoInputError
    from spo.io import atomic_dir

    target = tmp_path / "model"
    if kind == "regular_file":
        target.write_text("a user's file\n")
    else:
        _make(kind, target)
    before = os.lstat(target)
    with pytest.raises(SpoInputError) as err:
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("new")
    assert "\n" not in str(err.value) and str(target) in str(err.value)
    assert (os.lstat(target).st_mode, os.lstat(target).st_ino) == (before.st_mode, before.st_ino)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_dev_full_is_refused_and_stays_a_device():
    """Only looked at: /dev/full is never opened for writing here, and is still a character device after."""
    import stat

    from spo.errors import SpoInputError
    from spo.io import check_output_file

    with pytest.raises(SpoInputError) as err:
        check_output_file("/dev/full")
    assert "character device" in str(err.value)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


# --------------------------------------------------------------------------------------------- corrupt pair rows

def test_spm_eval_reports_skipped_rows(tmp_path, capsys):
    """A corrupt row (undecodable image bytes) is skipped and said so, with its count and reason, as `spo dpo`
    does; the JSON keeps the counts."""
    from spo.cli.main import main
    from spo.data.pickapic import write_pairs
    from spo.spm.model import StepAwarePreferenceModel
    from spo.toy.pairs import make_render_pair_rows

    rows = make_render_pair_rows(6, 0)
    rows[2]["jpg_0"] = b"\x89PNG\r\n\x1a\n but not really an image"
    write_pairs(tmp_path / "pairs.parquet", rows)
    StepAwarePreferenceModel.toy().save(tmp_path / "spm")
    code = main(["spm", "eval", str(tmp_path / "spm"), "--data", str(tmp_path / "pairs.parquet"), "--timesteps", "0",
                 "--out", str(tmp_path / "ev"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "skipped 1 (1 undecodable image)" in out and "row 2" in out, out
    read = json.loads((tmp_path / "ev" / "accuracy.json").read_text())["read"]
    assert read["rows"] == 6 and read["skipped"] == 1 and read["skipped_by_reason"] == {"undecodable image": 1}
