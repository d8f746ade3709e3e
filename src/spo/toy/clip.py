"""`spo toy clip`: a tiny CLIP pretrained contrastively on toy renders and their captions.

Real step-aware preference models start from a pretrained CLIP (PickScore, CLIP-ViT-H-14) and learn only the
preference on top. This is the toy world's stand-in for that pretraining: the SPM's toy architecture
(`spm.model.toy_config`), trained with transformers' own CLIP loss (symmetric InfoNCE, `return_loss=True`) on
renders with their random defects, saved as an ordinary transformers CLIP folder for `spo spm train --init`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from spo.toy.defaults import CLIP as DEFAULT_BUDGET


def pretrain_clip(out_dir: str | Path, n_images: int = DEFAULT_BUDGET["n_images"], steps: int = DEFAULT_BUDGET["steps"],
                  batch: int = DEFAULT_BUDGET["batch"], lr: float = DEFAULT_BUDGET["lr"], seed: int = 0) -> dict:
    from transformers import CLIPModel

    from spo.io import atomic_dir, write_json
    from spo.spm.model import CLIP_MEAN, CLIP_STD, toy_config
    from spo.tokenizer import load_clip_tokenizer
    from spo.images import images_to_tensor
    from spo.toy.build import one_cycle
    from spo.toy.defaults import shipped_world
    from spo.toy.render import render_dataset

    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    started = time.time()
    data = render_dataset(n_images, seed=seed + 100, split="train")  # the shipped models' world
    pixels = (images_to_tensor([im for _, _, im in data]) + 1) / 2  # [0, 1], then CLIP's normalisation
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = (pixels - mean) / std
    tok = load_clip_tokenizer()
    enc = tok([s.caption for s, _, _ in data], padding=True, truncation=True, max_length=77, return_tensors="pt")
    model = CLIPModel(toy_config())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = one_cycle(opt, lr, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="toy clip", unit="step")
    for _ in bar:
        idx = torch.randperm(n_images, generator=g)[:batch]
        out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx],
                    pixel_values=pixels[idx], return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    model.eval()
    info = {"world": shipped_world(), "n_images": n_images, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "final_loss": round(out.loss.item(), 4), "seconds": round(time.time() - started, 1),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "pretrain_info.json", info)
    return info
