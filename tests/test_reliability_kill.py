"""Kill-safe training: `spo train` and `spo spm train` are SIGKILLed at exact points (spo.faults, SPO_FAULT),
including in the middle of a checkpoint write; each time no torn checkpoint is visible, `--resume` goes on from
the last complete one, and the final weights equal an uninterrupted run's bit for bit (CPU, same seed).
NaN faults and a full disk are injected into the same runs: one-line error, exit 2, the checkpoints stay good.

Each run is a real subprocess (~10 s of imports and toy-model loading), so one chain of resumes visits many
kill points, and the uninterrupted reference run goes in parallel with it.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spo.train.checkpoint import STATE_FILE, complete_checkpoints

pytestmark = pytest.mark.slow  # integration: real training runs or subprocess chains

SCORER = '''
def brightness(images, prompts, t):
    """Brighter is better: any pixel function will do to drive training."""
    return images.mean((1, 2, 3)) * 10
'''

# 4 prompts / batch 2 = 2 batches per epoch, 2 epochs: checkpoints at 0000-00001, 0001-00000, 0001-00001,
# 0002-00000; LoRA saves lora-epoch-001, lora-epoch-002, lora (in that order).
TRAIN = ["train", "--max-prompts", "4", "--sample-batch-size", "2", "--num-steps", "3", "--divert-start-step", "1",
         "--k", "2", "--epochs", "2", "--checkpoint-every-batches", "1", "--keep-checkpoints", "2",
         "--validation-images", "0", "--report-to", "none", "--threshold", "0",
         "--preference", "rk_scorer:brightness", "--no-evaluate"]


def _env(tmp_path: Path, fault: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("SPO_FAULT", None)
    if fault:
        env["SPO_FAULT"] = fault
    return env


def _start(tmp_path: Path, args: list[str], fault: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "spo", *args], env=_env(tmp_path, fault), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run(tmp_path: Path, args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    p = _start(tmp_path, args, fault)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _killed(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])


def _error_line(r: subprocess.CompletedProcess, prefix: str, *words: str) -> None:
    """Exit 2 and one line on stderr naming the problem (library chatter before it aside), no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    # a progress bar may precede it on the same line, ending in "\r": the terminal shows the message alone
    lines = [ln[ln.index(prefix):] for ln in re.split(r"[\r\n]", r.stderr) if prefix in ln]
    assert len(lines) == 1, r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def _visible_checkpoints_are_complete(ckpt_dir: Path) -> list[str]:
    """Every non-hidden entry is a complete, loadable checkpoint; returns their names."""
    if not ckpt_dir.exists():
        return []
    visible = sorted(p for p in ckpt_dir.iterdir() if not p.name.startswith("."))
    assert visible == complete_checkpoints(ckpt_dir), visible
    for c in visible:
        assert (c / STATE_FILE).is_file()
        for f in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
            load_file(str(c / f))  # raises on a torn file
    return [c.name for c in visible]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture()
def scorer_dir(tmp_path):
    (tmp_path / "rk_scorer.py").write_text(SCORER)
    return tmp_path


def test_spo_train_survives_kill_nan_and_full_disk_at_every_point(scorer_dir):
    tmp = scorer_dir
    ref_dir, out = tmp / "ref", tmp / "run"
    ref = _start(tmp, [*TRAIN, "--output-dir", str(ref_dir)])  # uninterrupted, alongside the chain
    ckpts = out / "checkpoints"
    resume = [*TRAIN, "--output-dir", str(out), "--resume"]

    # 1. killed after sampling batch 2, before its optimizer step
    _killed(_run(tmp, [*TRAIN, "--output-dir", str(out)], "sampled:2"))
    assert _visible_checkpoints_are_complete(ckpts) == ["checkpoint-0000-00001"]

    # 2. killed in the middle of writing checkpoint-0001-00000 (trainable.safetensors written, no state.json)
    _killed(_run(tmp, resume, "checkpoint_mid:1"))
    assert _visible_checkpoints_are_complete(ckpts) == ["checkpoint-0000-00001"]
    torn = _hidden(ckpts)
    assert len(torn) == 1 and torn[0].startswith(".checkpoint-0001-00000.")
    assert (ckpts / torn[0] / "trainable.safetensors").is_file() and not (ckpts / torn[0] / STATE_FILE).exists()

    # 3. killed right after an optimizer step
    _killed(_run(tmp, resume, "optimizer_step:1"))
    assert _visible_checkpoints_are_complete(ckpts) == ["checkpoint-0000-00001"]

    # 4. killed right after a complete checkpoint; the torn folder of run 2 was cleaned by that save
    _killed(_run(tmp, resume, "checkpoint_done:1"))
    assert _visible_checkpoints_are_complete(ckpts) == ["checkpoint-0000-00001", "checkpoint-0001-00000"]
    assert _hidden(ckpts) == []
    assert (out / "lora-epoch-001" / "pytorch_lora_weights.safetensors").is_file()

    # 5. a NaN LoRA weight after a step: one line, exit 2, the good checkpoints untouched
    _error_line(_run(tmp, resume, "nan_weight:1"), "spo train: error:", "diverged", "non-finite LoRA weight")
    assert _visible_checkpoints_are_complete(ckpts) == ["checkpoint-0000-00001", "checkpoint-0001-00000"]

    # 6. the disk fills up while writing the next checkpoint: one line, exit 2, earlier outputs intact
    epoch1 = (out / "lora-epoch-001" / "pytorch_lora_weights.safetensors").read_bytes()
    _error_line(_run(tmp, resume, "checkpoint_mid:1:enospc"), "spo train: error:", "No space left on device")
    assert _visible_checkpoints_are_complete(ckpts) == ["checkpoint-0000-00001", "checkpoint-0001-00000"]
    assert _hidden(ckpts) == []  # the failed write removed its temporary folder
    assert (out / "lora-epoch-001" / "pytorch_lora_weights.safetensors").read_bytes() == epoch1

    # 7. killed while saving the final LoRA (weights written, summary not, folder not renamed)
    _killed(_run(tmp, resume, "lora_save:2"))
    assert _visible_checkpoints_are_complete(ckpts)[-1] == "checkpoint-0002-00000"
    assert not (out / "lora").exists() and any(n.startswith(".lora.") for n in _hidden(out))

    # 8. killed inside the atomic write of the webui LoRA file (after the final diffusers LoRA is in place)
    _killed(_run(tmp, resume, "write:3"))
    assert (out / "lora" / "training_summary.json").is_file()
    assert not (out / "spo_sd15_webui.safetensors").exists()
    assert any(n.startswith(".spo_sd15_webui.safetensors.") for n in _hidden(out))

    # 9. resume to the end: the same LoRAs as the uninterrupted run, and no temporaries left anywhere
    final = _run(tmp, resume)
    assert final.returncode == 0, final.stderr[-2000:]
    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-2000:]
    for rel in ("lora/pytorch_lora_weights.safetensors", "spo_sd15_webui.safetensors",
                "lora-epoch-001/pytorch_lora_weights.safetensors", "lora-epoch-002/pytorch_lora_weights.safetensors"):
        _same_tensors(ref_dir / rel, out / rel)
    assert _hidden(out) == [] and _hidden(ckpts) == [] and _hidden(out / "lora") == []


def _pairs(path: Path) -> Path:
    """A few clean-vs-defective renders of toy scenes (no base-model sampling: fast)."""
    from spo.data.pickapic import write_pairs
    from spo.toy.render import CLEAN, render, sample_defects
    from spo.toy.world import sample_scenes

    def png(img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    rng = np.random.default_rng(0)
    rows = [{"caption": s.caption, "jpg_0": png(render(s, CLEAN, seed=i)),
             "jpg_1": png(render(s, sample_defects(rng, 0.9), seed=i)), "label_0": 1.0, "label_1": 0.0}
            for i, s in enumerate(sample_scenes(6, seed=1))]
    write_pairs(path, rows, rows_per_group=2)  # three units, read one window at a time (see the buffer below)
    return path


def test_spm_train_survives_kills(tmp_path):
    data = _pairs(tmp_path / "pairs.parquet")
    args = ["spm", "train", str(data), "--steps", "4", "--batch-size", "2", "--lr", "1e-3", "--warmup", "2",
            "--seed", "5", "--checkpoint-every", "1", "--keep-checkpoints", "2", "--cpu", "--no-progress",
            # streamed: a buffer smaller than a row group (one unit a window) and a DataLoader worker, so the
            # resumes restart mid-epoch, mid-window, and the stream must continue exactly where it was
            "--shuffle-buffer-mb", "0.001", "--num-workers", "1"]
    ref_dir, out = tmp_path / "ref", tmp_path / "run"
    ref = _start(tmp_path, [*args, "--out", str(ref_dir)])
    ckpts = out / "checkpoints"
    resume = [*args, "--out", str(out), "--resume"]

    _killed(_run(tmp_path, [*args, "--out", str(out)], "spm_step:2"))  # after step 2, before its checkpoint
    assert _visible_checkpoints_are_complete(ckpts) == ["checkpoint-00000001"]

    _killed(_run(tmp_path, resume, "checkpoint_mid:1"))  # mid-write of checkpoint 2
    assert _visible_checkpoints_are_complete(ckpts) == ["checkpoint-00000001"]
    assert len(_hidden(ckpts)) == 1

    # Checkpoints 2, 3, 4 are two atomic writes each (state.json, the folder); the 8th write is the SPM's
    # config file inside its folder, after its weights.
    _killed(_run(tmp_path, resume, "write:8"))
    assert _visible_checkpoints_are_complete(ckpts) == ["checkpoint-00000003", "checkpoint-00000004"]
    assert _hidden(ckpts) == []
    assert not (out / "spm").exists() and any(n.startswith(".spm.") for n in _hidden(out))

    final = _run(tmp_path, resume)
    assert final.returncode == 0, final.stderr[-2000:]
    ref.communicate(timeout=300)
    assert ref.returncode == 0
    _same_tensors(ref_dir / "spm" / "model.safetensors", out / "spm" / "model.safetensors")
    assert _hidden(out) == [] and _hidden(ckpts) == []


# --------------------------------------------------------------------------------------------- full disk

def _lora_for_export(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from show_helpers import make_lora

    return make_lora(folder)


def test_full_disk_injected_keeps_earlier_outputs(tmp_path, monkeypatch, capsys):
    """ENOSPC raised inside the atomic write of `spo export`: one line, exit 2, the earlier export unchanged."""
    from spo import faults
    from spo.cli.main import main

    lora = _lora_for_export(tmp_path / "lora")
    out = tmp_path / "out"
    assert main(["export", str(lora), "--out", str(out), "--format", "webui", "--name", "x"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setenv("SPO_FAULT", "write:1:enospc")
    monkeypatch.setattr(faults, "_counts", {})
    capsys.readouterr()
    code = main(["export", str(lora), "--out", str(out), "--format", "webui", "--name", "x", "--dtype", "fp16"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("spo ")]
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # same files, same bytes, no temporaries


def test_full_disk_real_tmpfs(tmp_path, capsys):
    """A real 1 MiB tmpfs: the export that does not fit fails with one line; the small file already there stays."""
    from spo.cli.main import main

    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected test covers the code path")
    try:
        lora = _lora_for_export(tmp_path / "lora")
        (mnt / "earlier.txt").write_text("earlier output\n")
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))  # leave less room than the LoRA needs
        capsys.readouterr()
        code = main(["export", str(lora), "--out", str(mnt / "out"), "--format", "webui", "--name", "x"])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("spo ")]
        assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
        assert (mnt / "earlier.txt").read_text() == "earlier output\n"
        assert not (mnt / "out" / "x_webui.safetensors").exists()
        assert [p.name for p in (mnt / "out").iterdir()] == [] if (mnt / "out").exists() else True
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
