"""`spo spm train` / `spo spm eval` on tiny toy pairs: determinism, exact resume, both families, bad input."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spo.data.pickapic import write_pairs
from spo.errors import SpoInputError
from spo.spm.model import StepAwarePreferenceModel
from spo.train.checkpoint import complete_checkpoints
from spo.train.config import SPMConfig, build_config
from spo.train.spm_recipe import train

pytestmark = pytest.mark.slow  # integration: real training runs or subprocess chains


def spo(*args):
    return subprocess.run([sys.executable, "-m", "spo", *args], capture_output=True, text=True, timeout=300)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Clean vs defective renders of the same scene (fast; no base-model sampling), some ties, repeated captions."""
    from spo.toy.render import CLEAN, render, sample_defects
    from spo.toy.world import sample_scenes

    rng = np.random.default_rng(0)
    rows = []
    for i, scene in enumerate(sample_scenes(8, seed=1) * 2):
        good, bad = _png(render(scene, CLEAN, seed=i)), _png(render(scene, sample_defects(rng, 0.9), seed=i))
        if i % 5 == 4:
            l0 = l1 = 0.5
        elif i % 2:
            good, bad, l0, l1 = bad, good, 0.0, 1.0
        else:
            l0, l1 = 1.0, 0.0
        rows.append({"caption": scene.caption, "jpg_0": good, "jpg_1": bad, "label_0": l0, "label_1": l1})
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    write_pairs(path, rows)
    return path


def _cfg(pairs_file, out, **kw):
    base = dict(data=[str(pairs_file)], output_dir=str(out), max_train_steps=4, train_batch_size=2, learning_rate=1e-3,
                lr_warmup_steps=2, seed=5, checkpoint_every_steps=2, cpu=True, progress=False, max_t=1000)
    renamed = {"steps": "max_train_steps", "grad_accum": "gradient_accumulation_steps", "lr": "learning_rate",
               "checkpoint_every": "checkpoint_every_steps", "batch_size": "train_batch_size"}
    base.update({renamed.get(k, k): v for k, v in kw.items()})
    return build_config(None, None, base, SPMConfig)


def latest_checkpoint(folder):
    return complete_checkpoints(folder)[-1]


def _weights(out):
    return load_file(str(out / "spm" / "model.safetensors"))


def test_resume_equals_uninterrupted_run(pairs_file, tmp_path):
    full = train(_cfg(pairs_file, tmp_path / "full", grad_accum=2, steps=2, checkpoint_every=1, keep_checkpoints=2))
    assert full["steps"] == 2 and full["pairs"] == 16
    part = train(_cfg(pairs_file, tmp_path / "part", grad_accum=2, steps=1, checkpoint_every=1))
    assert part["steps"] == 1
    assert latest_checkpoint(tmp_path / "part" / "checkpoints").name == "checkpoint-00000001"
    resumed = train(_cfg(pairs_file, tmp_path / "part", grad_accum=2, steps=2, checkpoint_every=1, resume=True))
    assert resumed["resumed_from_step"] == 1
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # training moved the time modulation away from its zero init
    assert a["layer_adaln.0.1.weight"].abs().sum() > 0
    # the logs and the kept checkpoints are there; no partial folder is left behind
    assert any((tmp_path / "full" / "logs").iterdir())
    names = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert names == ["checkpoint-00000001", "checkpoint-00000002"]
    spm = StepAwarePreferenceModel.load(tmp_path / "full" / "spm")
    assert spm.family == "sd15" and spm.base_model == "toy:sd15" and spm.training_summary["steps"] == 2


def test_streaming_and_in_memory_train_the_same_spm(pairs_file, tmp_path):
    """The bar of issue 21: a small set trains to the same weights streamed and read into memory; a set larger
    than the shuffle buffer trains the same with DataLoader workers as without."""
    from spo.data.pickapic import read_pairs
    from spo.data.stream import build_index

    kw = dict(steps=3, checkpoint_every=0, batch_size=3)
    train(_cfg(pairs_file, tmp_path / "mem", data_in_memory=True, **kw))
    train(_cfg(pairs_file, tmp_path / "stream", **kw))
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert all(torch.equal(a[k], b[k]) for k in a)

    groups = tmp_path / "groups.parquet"
    write_pairs(groups, read_pairs(pairs_file)[0], rows_per_group=3)
    buffer_mb = 3 * max(u.nbytes for u in build_index(groups, buffer_bytes=0).units) / 2**20
    window = dict(shuffle_buffer_mb=buffer_mb, **kw)
    zero = train(_cfg(groups, tmp_path / "w0", **window))
    two = train(_cfg(groups, tmp_path / "w2", num_workers=2, **window))
    assert zero["pairs"] == two["pairs"] == 16
    c, d = _weights(tmp_path / "w0"), _weights(tmp_path / "w2")
    assert all(torch.equal(c[k], d[k]) for k in c)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # a block-shuffled order: other pairs, other weights


def test_same_seed_same_result_other_seed_differs(pairs_file, tmp_path):
    train(_cfg(pairs_file, tmp_path / "a", steps=1, checkpoint_every=0))
    train(_cfg(pairs_file, tmp_path / "b", steps=1, checkpoint_every=0))
    train(_cfg(pairs_file, tmp_path / "c", steps=1, checkpoint_every=0, seed=6))
    a, b, c = (_weights(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_global_batch_is_the_accumulation_it_implies(pairs_file, tmp_path):
    kw = dict(steps=2, checkpoint_every=0, lr_warmup_steps=1, lr_schedule="linear")
    explicit = train(_cfg(pairs_file, tmp_path / "a", grad_accum=2, **kw))
    derived = train(_cfg(pairs_file, tmp_path / "b", global_batch_size=4, **kw))  # 4 pairs = 2 x 2 batches, 1 process
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the run records the settings it trained with: the derived accumulation, the global batch resolved
    assert derived["config"] == explicit["config"] | {"output_dir": str(tmp_path / "b")}
    assert derived["config"]["gradient_accumulation_steps"] == 2 and derived["config"]["global_batch_size"] == 0
    with pytest.raises(SpoInputError, match="relabel-with"):
        train(_cfg(pairs_file, tmp_path / "c", relabel_required=True, **kw))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_fused_backward_pass_trains_the_unfused_weights(pairs_file, tmp_path, optimizer):
    """Without clipping, stepping each weight inside the backward is the same update as one step after it."""
    kw = dict(steps=3, checkpoint_every=0, max_grad_norm=0.0, optimizer=optimizer)
    train(_cfg(pairs_file, tmp_path / "plain", **kw))
    train(_cfg(pairs_file, tmp_path / "fused", fused_backward_pass=True, **kw))
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "fused")
    assert all(torch.equal(a[k], b[k]) for k in a)
    clipped = train(_cfg(pairs_file, tmp_path / "clip", **{**kw, "max_grad_norm": 1e-3}, fused_backward_pass=True))
    assert clipped["steps"] == 3 and not all(torch.equal(a[k], c) for k, c in _weights(tmp_path / "clip").items())


def test_fused_backward_pass_frees_each_gradient_before_the_next():
    """The memory claim itself: after any weight's step no other completed gradient is alive; and the weights are
    those of one plain step after the backward."""
    from spo.train.engine import fuse_optimizer_step

    images, prompts, t = torch.rand(2, 3, 32, 32) * 2 - 1, ["a red circle", "a blue square"], torch.tensor([10, 500])
    plain, fused = StepAwarePreferenceModel.toy(), StepAwarePreferenceModel.toy()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    plain(images, prompts, t).sum().backward()
    optimizer.step()
    params = list(fused.parameters())
    fuse_optimizer_step(torch.optim.AdamW(params, lr=1e-2), params, max_grad_norm=0.0)
    alive = []
    for p in params:  # registered after the fused step, so each runs right after its parameter's step
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    fused(images, prompts, t).sum().backward()
    assert len(alive) == len(params) and max(alive) == 0
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), params))
    assert not all(torch.equal(p, q) for p, q in zip(params, StepAwarePreferenceModel.toy().parameters()))


def test_full_bf16_keeps_bf16_weights_with_fp32_moments_and_resumes_exactly(pairs_file, tmp_path):
    from accelerate.state import AcceleratorState

    kw = dict(full_bf16=True, fused_backward_pass=True, mixed_precision="bf16", checkpoint_every=2)
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's state is per process: bf16 here only
    try:
        full = train(_cfg(pairs_file, tmp_path / "full", steps=4, **kw))
        train(_cfg(pairs_file, tmp_path / "part", steps=2, **kw))
        train(_cfg(pairs_file, tmp_path / "part", steps=4, resume=True, **kw))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    weights = _weights(tmp_path / "full")
    assert full["steps"] == 4 and {w.dtype for w in weights.values()} == {torch.bfloat16}
    fresh = StepAwarePreferenceModel.toy().state_dict()
    assert sum(not torch.equal(w, fresh[k].bfloat16()) for k, w in weights.items()) > len(weights) // 2
    moments = load_file(str(latest_checkpoint(tmp_path / "full" / "checkpoints") / "optimizer.safetensors"))
    assert {v.dtype for k, v in moments.items() if k.endswith("exp_avg")} == {torch.float32}
    resumed = _weights(tmp_path / "part")
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)


@pytest.mark.parametrize("change", [dict(fused_backward_pass=False), dict(mixed_precision="no")])
def test_full_bf16_needs_bf16_and_the_fused_pass(pairs_file, tmp_path, change):
    from spo.errors import SpoInputError

    with pytest.raises(SpoInputError, match="full_bf16 needs --mixed-precision bf16 and --fused-backward-pass"):
        _cfg(pairs_file, tmp_path / "x", **{**dict(full_bf16=True, fused_backward_pass=True, mixed_precision="bf16"),
                                            **change})


def test_resume_refuses_changed_settings(pairs_file, tmp_path):
    from spo.errors import SpoInputError

    train(_cfg(pairs_file, tmp_path / "r", steps=1, checkpoint_every=1))
    with pytest.raises(SpoInputError, match="settings differ.*learning_rate"):
        train(_cfg(pairs_file, tmp_path / "r", steps=2, lr=2e-3, resume=True))


def test_resume_refuses_a_decaying_schedule_over_another_horizon(pairs_file, tmp_path):
    """More steps on resume extend a constant rate exactly (above); a cosine one would bend the trained part."""
    from spo.errors import SpoInputError

    train(_cfg(pairs_file, tmp_path / "r", steps=2, checkpoint_every=1, lr_schedule="cosine", lr_warmup_steps=0))
    with pytest.raises(SpoInputError, match="cosine learning rate decays over 2 optimizer steps, this run's over 4"):
        train(_cfg(pairs_file, tmp_path / "r", steps=4, resume=True, lr_schedule="cosine", lr_warmup_steps=0))
    assert train(_cfg(pairs_file, tmp_path / "r", steps=2, resume=True, lr_schedule="cosine",
                      lr_warmup_steps=0))["resumed_from_step"] == 2


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default(pairs_file, tmp_path):
    """An older spo wrote no `fused_backward_pass` (nor `full_bf16`) into the checkpoint: the run then had the
    default, so resuming with the default continues, and with the setting changed is refused."""
    import json

    from spo.errors import SpoInputError

    train(_cfg(pairs_file, tmp_path / "r", steps=1, checkpoint_every=1))
    state_file = latest_checkpoint(tmp_path / "r" / "checkpoints") / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("fused_backward_pass", "full_bf16"):
        del state["progress"]["fingerprint"][key]
    state_file.write_text(json.dumps(state))
    with pytest.raises(SpoInputError, match="settings differ.*fused_backward_pass"):
        train(_cfg(pairs_file, tmp_path / "r", steps=2, resume=True, fused_backward_pass=True))
    assert train(_cfg(pairs_file, tmp_path / "r", steps=2, resume=True))["resumed_from_step"] == 1


def test_relabel_with_a_saved_spm(pairs_file, tmp_path):
    scorer = StepAwarePreferenceModel.toy(family="sd15", base_model="toy:sd15")
    scorer.save(tmp_path / "scorer")
    # a huge threshold makes every pair a tie: the loss is then minimised by equal scores
    result = train(_cfg(pairs_file, tmp_path / "rl", steps=1, checkpoint_every=0, relabel_with=str(tmp_path / "scorer"),
                        relabel_threshold=0.99))
    assert result["relabel"]["ties"] == 16


def test_relabel_with_a_plain_clip_folder(pairs_file, tmp_path):
    # the SDXL recipe relabels by clean-image PickScore: a transformers CLIP folder is taken as it is
    from transformers import CLIPModel

    from spo.spm.model import toy_config

    torch.manual_seed(0)
    CLIPModel(toy_config()).save_pretrained(tmp_path / "pickscore")
    result = train(_cfg(pairs_file, tmp_path / "rl", steps=1, checkpoint_every=0, relabel_with=str(tmp_path / "pickscore"),
                        relabel_threshold=0.0))
    assert result["relabel"]["ties"] == 0  # threshold 0: every pair with unequal scores gets a winner


def test_cli_train_sdxl_time_unconditioned_and_eval(pairs_file, tmp_path):
    out = tmp_path / "xl"
    r = spo("spm", "train", str(pairs_file), "--out", str(out), "--base", "toy:sdxl", "--steps", "1",
            "--batch-size", "2", "--lr", "1e-3", "--warmup", "0", "--checkpoint-every", "0", "--cpu",
            "--no-time-conditioning", "--gradient-checkpointing", "--max-t", "800")
    assert r.returncode == 0, r.stderr[-2000:]
    spm = StepAwarePreferenceModel.load(out / "spm")
    assert spm.family == "sdxl" and not spm.time_conditioning
    # a fresh step-aware SPM for the same family, evaluated in the same plot
    StepAwarePreferenceModel.toy(family="sdxl", base_model="toy:sdxl").save(tmp_path / "fresh")
    ev = tmp_path / "ev"
    r = spo("spm", "eval", str(out), str(tmp_path / "fresh"), "--data", str(pairs_file), "--base", "toy:sdxl",
            "--timesteps", "0,951", "--out", str(ev), "--min-judge-gap", "0.05", "--limit", "4", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((ev / "accuracy.json").read_text())
    assert result["timesteps"] == [0, 951] and len(result["models"]) == 2
    assert result["ties_excluded"] == 3 and 0 < result["n_pairs"] <= 4
    for m in result["models"]:
        assert all(0.0 <= v <= 1.0 for v in m["accuracy"].values())
        assert all(np.isfinite(v) and v >= 0.0 for v in m["log_loss"].values())
    # the two scorers compared on the very same pairs: the paired difference is exactly the accuracy gap
    (paired,) = result["paired"]
    a, b = result["models"]
    for t in ("0", "951"):
        assert paired["b_minus_a"][t] == pytest.approx(b["accuracy"][t] - a["accuracy"][t], abs=1e-12)
    assert "minus" in r.stdout and "log loss" in r.stdout
    assert (ev / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "t=951" in r.stdout and "time-unconditioned" in r.stdout
    # against the toy judge's aesthetic order, the rater's ties are no longer excluded
    r = spo("spm", "eval", str(out), "--data", str(pairs_file), "--base", "toy:sdxl", "--timesteps", "0",
            "--out", str(ev), "--against", "judge", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    judged = json.loads((ev / "accuracy.json").read_text())
    assert judged["against"] == "judge" and judged["ties_excluded"] == 0
    assert judged["n_pairs"] + judged["filtered_by_judge_gap"] == 16
    assert "judge's aesthetic order" in r.stdout
    # an SDXL SPM is refused on the SD1.5 base model
    r = spo("spm", "eval", str(out), "--data", str(pairs_file), "--out", str(ev), "--no-progress")
    assert r.returncode == 2 and "trained for sdxl" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_eval_same_judge_alignment_keeps_only_equally_aligned_pairs(pairs_file, tmp_path):
    from spo.data.pickapic import read_pairs
    from spo.spm.evaluate import evaluate
    from spo.toy import judge

    StepAwarePreferenceModel.toy(family="sd15", base_model="toy:sd15").save(tmp_path / "fresh")
    pairs, _ = read_pairs([pairs_file])
    aligned = [[judge.alignment(im, p.caption) for im in p.decode()] for p in pairs]
    aes = [[judge.aesthetic(im) for im in p.decode()] for p in pairs]
    expect = sum(a0 == a1 and e0 != e1 for (a0, a1), (e0, e1) in zip(aligned, aes))
    assert 0 < expect < len(pairs)  # the fixture has both kinds, so the filter has something to do
    result = evaluate([tmp_path / "fresh"], [pairs_file], timesteps=[0], against="judge", same_judge_alignment=True,
                      progress=False)
    assert result["same_judge_alignment"] and result["n_pairs"] == expect
    assert result["n_pairs"] + result["filtered_by_judge_gap"] == len(pairs)
    # equally aligned pairs: the rater's noise-free utility orders them by aesthetics alone
    assert result["references"]["rater_utility_without_noise"]["accuracy"] == 1.0
    assert result["references"]["unequally_aligned"] == 0.0
    # on all pairs the references are what the rater's rule and the labels say, computed here by hand
    full = evaluate([tmp_path / "fresh"], [pairs_file], timesteps=[0], against="judge", progress=False)
    kept = [i for i, (e0, e1) in enumerate(aes) if e0 != e1]
    judge_winner = {i: int(aes[i][1] > aes[i][0]) for i in kept}
    util_winner = {i: int(2 * aligned[i][1] + aes[i][1] > 2 * aligned[i][0] + aes[i][0]) for i in kept}
    labelled = [i for i in kept if not pairs[i].is_tie]
    ref = full["references"]
    assert ref["rater_utility_without_noise"]["accuracy"] == pytest.approx(
        np.mean([util_winner[i] == judge_winner[i] for i in kept]))
    assert ref["rater_labels"]["n"] == len(labelled)
    assert ref["rater_labels"]["accuracy"] == pytest.approx(np.mean([pairs[i].preferred == judge_winner[i] for i in labelled]))
    assert ref["unequally_aligned"] == pytest.approx(np.mean([aligned[i][0] != aligned[i][1] for i in kept]))


@pytest.mark.parametrize("extra", [
    ["--max-train-steps", "0"],
    ["--learning-rate", "abc"],
    ["--max-t", "2000"],
    ["--relabel-threshold", "1.5"],
    ["--init", "/no/such/clip"],
    ["--relabel-with", "spo.spm.evaluate:nope"],
    ["--fused-backward-pass", "--gradient-accumulation-steps", "2"],
    ["--fused-backward-pass", "--train-batch-size", "2", "--global-batch-size", "4"],
    ["--fused-backward-pass", "--mixed-precision", "fp16"],
])
def test_cli_train_bad_values_one_line_exit_2(pairs_file, tmp_path, extra):
    r = spo("spm", "train", str(pairs_file), "--out", str(tmp_path / "o"), "--cpu", "--no-progress", *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_cli_missing_data_and_unwritable_out(pairs_file, tmp_path):
    r = spo("spm", "train", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o"), "--cpu")
    assert r.returncode == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = spo("spm", "train", str(pairs_file), "--out", str(blocker / "sub"), "--cpu")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = spo("spm", "eval", str(tmp_path / "nope"), "--data", str(pairs_file), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "spm_config.json" in r.stderr
    r = spo("spm", "eval", str(tmp_path / "nope"), "--data", str(pairs_file), "--timesteps", "0,1000")
    assert r.returncode == 2 and "timesteps" in r.stderr


DIST_SCRIPT = """
import json, os, sys
from spo.train import pair_batches
from spo.cli.main import main

seen = []
read = pair_batches.StreamBatches.__getitem__
def spy(self, m):  # records what each process trains on; the batch itself is the real one
    batch = read(self, m)
    seen.append([m, batch["rows"]])
    return batch
pair_batches.StreamBatches.__getitem__ = spy
code = main(sys.argv[1:])
with open(os.path.join(sys.argv[sys.argv.index("--out") + 1] + "-seen-" + os.environ.get("RANK", "0")), "w") as f:
    json.dump(seen, f)
sys.exit(code)
"""


def test_two_gloo_processes_see_the_pairs_of_one_with_twice_the_batch(pairs_file, tmp_path):
    """accelerate over torch.distributed (gloo): 2 processes x batch 1 see per step the pairs 1 process x batch 2
    sees, streamed from a set larger than the shuffle buffer (each process reads its own share of each window).
    (The weights differ: each process draws its own timesteps and noise, from (seed, batch, process).)"""
    import os

    from spo.data.pickapic import read_pairs

    groups = tmp_path / "groups.parquet"
    write_pairs(groups, read_pairs(pairs_file)[0], rows_per_group=3)
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    args = ["spm", "train", str(groups), "--steps", "10", "--lr", "1e-3", "--warmup", "0", "--seed", "5",
            "--checkpoint-every", "0", "--cpu", "--no-progress", "--report-to", "none", "--shuffle-buffer-mb", "0.01"]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29547", str(script), *args, "--batch-size", "1", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), *args, "--batch-size", "2", "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    seen = {name: json.loads((tmp_path / name).read_text()) for name in ("two-seen-0", "two-seen-1", "one-seen-0")}
    whole = seen["one-seen-0"]
    assert [m for m, _ in whole] == list(range(10)) and all(len(rows) == 2 for _, rows in whole)
    assert len({r for _, rows in whole for r in rows}) == 16  # 20 pairs drawn: all 16 rows within the first epoch
    for (m, rows), (m0, r0), (m1, r1) in zip(whole, seen["two-seen-0"], seen["two-seen-1"]):
        assert m == m0 == m1 and r0 + r1 == rows
    assert json.loads((tmp_path / "two" / "spm" / "spm_config.json").read_text())["training"]["processes"] == 2
