"""The training engine and the config system shared by `spo train`, `spo dpo` and `spo spm train`:
--print-config round-trips through --config, old flag spellings still work (with a deprecation line), one run per
output folder, and an interrupted run's history and training time survive --resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spo.train.config import DPOConfig, SPMConfig, SPOConfig, build_config, preset_names, to_toml
from test_reliability_kill import SCORER
from test_reliability_kill import TRAIN as KILL_TRAIN

pytestmark = pytest.mark.slow  # integration: real training runs or subprocess chains

# The reliability suite's short SPO run (4 prompts / batch 2 = 2 batches per epoch) and its brightness scorer;
# later flags override its --epochs.
TRAIN = [*KILL_TRAIN, "--no-report"]


def _env(tmp_path: Path) -> dict:
    (tmp_path / "rk_scorer.py").write_text(SCORER)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


def _spo(tmp_path, args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spo", *args], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.mark.parametrize("command,cls", [("train", SPOConfig), ("dpo", DPOConfig), ("spm train", SPMConfig)])
def test_print_config_round_trips_through_config(tmp_path, command, cls):
    first = _spo(tmp_path, [*command.split(), "--print-config", "--seed", "3"])
    assert first.returncode == 0, first.stderr
    again = _spo(tmp_path, [*command.split(), "--config", "/dev/stdin", "--print-config"], input=first.stdout)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and "seed = 3" in first.stdout
    # what it prints is the config the trainer would run, for every preset
    for name in preset_names(cls):
        cfg = build_config(name, cls=cls)
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(cfg))
        assert build_config(None, path, cls=cls) == cfg


def test_old_spm_flag_spellings_work_with_a_deprecation_line(tmp_path):
    r = _spo(tmp_path, ["spm", "train", "x.parquet", "--steps", "7", "--lr", "2e-4", "--batch-size", "3", "--cfg", "4",
                        "--no-time-conditioning", "--print-config"])
    assert r.returncode == 0, r.stderr
    for line in ("max_train_steps = 7", "learning_rate = 0.0002", "train_batch_size = 3", "cfg_scale = 4.0",
                 "time_conditioning = false", 'data = ["x.parquet"]'):
        assert line in r.stdout
    assert "--steps is deprecated, use --max-train-steps" in r.stderr and "Traceback" not in r.stderr


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "spo", *TRAIN, "--epochs", "3", "--max-prompts", "24",
                              "--out", str(out)],
                             env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 900
        while not out.is_dir() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()[1][-2000:]
        second = _spo(tmp_path, [*TRAIN, "--epochs", "3", "--out", str(out)])
        assert second.returncode == 2 and "another training run is writing to this folder" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.communicate()
    # the lock goes with its process, even one killed outright
    third = _spo(tmp_path, [*TRAIN, "--epochs", "1", "--out", str(tmp_path / "other")])
    assert third.returncode == 0, third.stderr[-2000:]


def test_history_survives_an_interrupt_and_resume(tmp_path):
    long = [*TRAIN, "--epochs", "3", "--max-prompts", "24"]  # 12 batches an epoch: time to interrupt the second
    full = _spo(tmp_path, [*long, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "part"
    args = [*long, "--out", str(out)]
    # A background job's children start with SIGINT ignored (then Python raises no KeyboardInterrupt): restore it.
    p = subprocess.Popen([sys.executable, "-m", "spo", *args], env=_env(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def in_second_epoch():  # a checkpoint of epoch index 1 (older ones are pruned as the run goes)
        return any((c / "state.json").is_file() for c in (out / "checkpoints").glob("checkpoint-0001-*"))

    deadline = time.time() + 900  # a loaded CI machine may take minutes to get there
    while not in_second_epoch() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert in_second_epoch() and p.poll() is None, "the run should be in its second epoch now"
    p.send_signal(signal.SIGINT)  # Ctrl-C in the second of three epochs
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    resumed = _spo(tmp_path, [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "full" / "history.json").read_text())
    b = json.loads((out / "history.json").read_text())
    assert len(a) == len(b) == 36
    assert [(h["epoch"], h["step"], h["loss"]) for h in a] == [(h["epoch"], h["step"], h["loss"]) for h in b]
    # the training time counts the part before the interrupt too (as far as its last checkpoint), so that an
    # epoch's cost in a resumed run compares with an uninterrupted one's
    summary = json.loads((out / "lora" / "training_summary.json").read_text())
    assert summary["seconds"] > summary["seconds_this_run"] > 0
