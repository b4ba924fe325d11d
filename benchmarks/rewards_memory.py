"""Exact CPU peak memory of a reward's score + input gradient at real size (issue 18; docs/rewards.md "Memory").

For each reward tower, batch B in {1, 4} and ``checkpoint`` off/on: the peak bytes the CPU allocator holds
above the level at entry (torch profiler allocator events, `flowkern.profiling.peak_memory`) while running
``reward(images, prompts)`` and ``autograd.grad`` to the images. Weights are allocated before (not counted);
prompts are encoded once before (cached text features / token ids, as in training). Images enter at the
tower's own resolution (the resize is a no-op), fp32 weights and activations, random weights.

Towers: ``vit-h-14`` (HPSv2 / v2.1 / PickScore: CLIP ViT-H/14 at 224 px), ``vit-l-14`` (aesthetic, CLIPScore:
ViT-L/14 at 224 px), ``blip-224`` (ImageReward as released: BLIP ViT-L/16 at 224 px + bert-base with
cross-attention), ``blip-384`` (the same at 384 px). Writes ``<out>/memory.json`` and ``<out>/memory.md``; the
fit (fixed + per-image bytes) is what `flowkern.rewards.memory` serves to a planner. Needs ~6 GB (ViT-H-14):

    flock /tmp/flowkern-heavy.lock python -m benchmarks.rewards_memory --out benchmarks/results/rewards
    python -m benchmarks.rewards_memory --towers tiny --out /tmp/mem   # smoke (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowkern.profiling import peak_memory  # noqa: E402
from flowkern.rewards.memory import fit_fixed_per_image  # noqa: E402

KNOWN_TOWERS = ("vit-h-14", "blip-224", "blip-384", "vit-l-14", "tiny-clip", "tiny-blip")

PROMPTS = ["a red cat sitting on a blue sofa", "a mountain lake at sunset"]


def _clip_reward(config: dict, checkpoint: bool):
    from transformers import CLIPConfig, CLIPModel

    from flowkern.rewards import CLIPScoreReward
    from tests.rewards_originals import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    cfg = CLIPConfig(**config)
    cfg.text_config.vocab_size = max(cfg.text_config.vocab_size, len(tok))
    model = CLIPModel(cfg)
    return CLIPScoreReward(model, tok, checkpoint=checkpoint), cfg.vision_config.image_size


def _blip_reward(image_size: int, checkpoint: bool, tiny: bool = False):
    from flowkern.rewards import ImageRewardModel, ImageRewardReward
    from tests.rewards_originals import tiny_bert_tokenizer

    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
        text = dict(vocab_size=40, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
                    max_position_embeddings=40)  # fmt: skip
        head = (24, 16, 8, 1)
    else:  # BLIP ViT-L/16 + bert-base with cross-attention (THUDM/ImageReward)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      patch_size=16)  # fmt: skip
        text = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=512)  # fmt: skip
        head = (768, 1024, 128, 64, 16, 1)
    vision.update(image_size=image_size, hidden_act="gelu", layer_norm_eps=1e-6)
    text.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0, bos_token_id=None,
                sep_token_id=None)  # fmt: skip
    model = ImageRewardModel(vision, text, head)
    return ImageRewardReward(model, tiny_bert_tokenizer(), checkpoint=checkpoint), image_size


def build(tower: str, checkpoint: bool):
    from tests.rewards_originals import HF_CLIP

    if tower == "vit-h-14":
        return _clip_reward(HF_CLIP["pickscore"], checkpoint)
    if tower == "vit-l-14":
        return _clip_reward(HF_CLIP["clipscore"], checkpoint)
    if tower in ("blip-224", "blip-384"):
        return _blip_reward(int(tower.split("-")[1]), checkpoint)
    if tower == "tiny-clip":
        return _clip_reward(HF_CLIP["tiny"], checkpoint)
    if tower == "tiny-blip":
        return _blip_reward(32, checkpoint, tiny=True)
    raise ValueError(f"unknown tower {tower!r}")


def measure(reward, size: int, batch: int) -> dict:
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    prompts = [PROMPTS[i % 2] for i in range(batch)]
    with torch.no_grad():
        reward(images, prompts)  # encodes / tokenizes the prompts once (cached, as in training)

    def step():
        x = images.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(reward(x, prompts).sum(), x)
        return grad

    t0 = time.time()
    peak = peak_memory(step)
    return {"peak_bytes": int(peak), "seconds": round(time.time() - t0, 1)}


def markdown(results: dict) -> str:
    lines = [
        "# Reward score + input-gradient peak memory (CPU, fp32, exact allocator peak)",
        "",
        "`python -m benchmarks.rewards_memory` (under `flock /tmp/flowkern-heavy.lock`); peak bytes above the",
        "entry level of `reward(images, prompts)` + `autograd.grad` to the images, weights excluded, prompts",
        "cached. Fit: peak = fixed + per_image * B (from B = 1 and B = 4).",
        "",
        "| tower | px | checkpoint | B=1 MiB | B=4 MiB | fixed MiB | per image MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for tower, rows in results["towers"].items():
        for ckpt in ("off", "on"):
            r = rows[ckpt]
            fixed, per = r["fit"]["fixed_bytes"], r["fit"]["per_image_bytes"]
            lines.append(
                f"| {tower} | {rows['image_size']} | {ckpt} | {r['B1']['peak_bytes'] / 2**20:.1f} | "
                f"{r['B4']['peak_bytes'] / 2**20:.1f} | {fixed / 2**20:.1f} | {per / 2**20:.1f} |"
            )
    lines += ["", f"torch {results['torch']}, {results['threads']} threads, {results['date']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--towers", default="vit-h-14,blip-224,blip-384,vit-l-14", help="comma list, or 'tiny'")
    p.add_argument("--out", default="benchmarks/results/rewards")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    towers = ["tiny-clip", "tiny-blip"] if args.towers == "tiny" else args.towers.split(",")
    results = {"torch": torch.__version__, "threads": args.threads, "date": time.strftime("%Y-%m-%d"), "towers": {}}
    for tower in towers:
        if tower not in KNOWN_TOWERS:
            raise SystemExit(f"unknown tower {tower!r}; known: {list(KNOWN_TOWERS)}")
        rows = {}
        for ckpt in (False, True):
            torch.manual_seed(0)
            reward, size = build(tower, ckpt)
            r = {f"B{b}": measure(reward, size, b) for b in (1, 4)}
            fixed, per = fit_fixed_per_image(r["B1"]["peak_bytes"], r["B4"]["peak_bytes"], 1, 4)
            r["fit"] = {"fixed_bytes": fixed, "per_image_bytes": per}
            rows["on" if ckpt else "off"] = r
            rows["image_size"] = size
            print(tower, "checkpoint" if ckpt else "plain", json.dumps(r), flush=True)
            del reward
        results["towers"][tower] = rows
        os.makedirs(args.out, exist_ok=True)  # written after each tower (a long run keeps what it measured)
        with open(os.path.join(args.out, "memory.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "memory.md"), "w") as f:
            f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
