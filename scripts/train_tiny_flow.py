"""Train the tiny pixel-space flow model that ships in ``flowkern/assets/tiny_flow`` (the `flowkern demo` model).

A diffusers ``SD3Transformer2DModel`` (in_channels=3, 16x16 RGB pixels, patch 2, 4 joint blocks, width 64, ~0.6 M
parameters) trained with rectified flow in paper time (M1): x_t = (1 - t) x0 + t x1, x0 ~ N(0, I), x1 an image,
target v = x1 - x0, through the same adapter as SD3 (``flowkern.models.sd3.SD3FlowModel``, which converts to
diffusers' timestep = 1000 (1 - t) and v = -noise_pred, M3). Data: procedural coloured shapes
(``flowkern.app.shapes``), one class per "prompt"; each prompt's conditioning is a fixed pair of random embeddings
(seeded) stored beside the weights; 10% of the samples get the null (all-zero) prompt so CFG (M5) works.

Reproducible: one thread, seeded data and initialisation; the EMA weights are saved. The run that produced the
shipped weights (4000 steps, batch 64, torch 2.13 CPU, one thread on a 2-core AMD EPYC machine):

    python scripts/train_tiny_flow.py --out flowkern/assets/tiny_flow

took 13.2 min of CPU time (``time``: user 13m14s; ~0.2 s per step on an idle core) and 23 min of wall time because
other jobs shared the two cores; final EMA loss 0.065. ``flowkern_tiny.json`` records the command and settings.

Layout written (diffusers ``save_pretrained`` for the transformer):

    <out>/transformer/config.json, diffusion_pytorch_model.safetensors   (fp32 EMA weights)
    <out>/prompts.safetensors      prompt_embeds [C, L, D], pooled_prompt_embeds [C, P], negative_* (zeros)
    <out>/flowkern_tiny.json       class names, image size, sampling defaults, training settings and wall time
    <out>/samples.png              a grid of samples (a row per class), for a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from flowkern.app.shapes import CLASS_NAMES, render_shapes
from flowkern.models.sd3 import SD3Conditioning, SD3FlowModel

TRANSFORMER_CONFIG = dict(
    sample_size=16,
    patch_size=2,
    in_channels=3,
    out_channels=3,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=64,  # = num_attention_heads * attention_head_dim (the context stream's width)
    pooled_projection_dim=32,
    pos_embed_max_size=16,
)
PROMPT_TOKENS = 4


def prompt_table(seed: int) -> dict[str, torch.Tensor]:
    """Fixed conditioning per class: N(0, 1) embeddings from ``seed``; the null prompt is all zeros."""
    g = torch.Generator().manual_seed(seed)
    n = len(CLASS_NAMES)
    embeds = torch.randn(n, PROMPT_TOKENS, TRANSFORMER_CONFIG["joint_attention_dim"], generator=g)
    pooled = torch.randn(n, TRANSFORMER_CONFIG["pooled_projection_dim"], generator=g)
    return {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": torch.zeros(1, *embeds.shape[1:]),
        "negative_pooled_prompt_embeds": torch.zeros(1, pooled.shape[1]),
    }


def conditioning(table: dict[str, torch.Tensor], labels: torch.Tensor, drop: torch.Tensor | None = None):
    """SD3Conditioning for class ``labels`` [B]; rows where ``drop`` is True get the null prompt."""
    embeds = table["prompt_embeds"][labels]
    pooled = table["pooled_prompt_embeds"][labels]
    if drop is not None:
        keep = (~drop).float()
        embeds = embeds * keep[:, None, None]
        pooled = pooled * keep[:, None]
    return SD3Conditioning(embeds, pooled)


@torch.no_grad()
def sample(model: SD3FlowModel, table, labels: torch.Tensor, steps: int, guidance: float, generator) -> torch.Tensor:
    """Euler sampling (M2) on a uniform grid with CFG (M5); returns x_1 [B, 3, H, W] in the model's pixel space."""
    size = TRANSFORMER_CONFIG["sample_size"]
    x = torch.randn(labels.numel(), 3, size, size, generator=generator)
    b = labels.numel()
    cond = SD3Conditioning(
        table["prompt_embeds"][labels],
        table["pooled_prompt_embeds"][labels],
        table["negative_prompt_embeds"].expand(b, -1, -1),
        table["negative_pooled_prompt_embeds"].expand(b, -1),
        guidance_scale=guidance,
    )
    ts = torch.linspace(0, 1, steps + 1)
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * model.velocity(x, ts[i].expand(b), cond)
    return x


def save_grid(images: torch.Tensor, rows: int, path: str, scale: int = 4) -> None:
    from PIL import Image

    pixels = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    cols = images.shape[0] // rows
    grid = torch.cat([torch.cat(list(pixels[r * cols : (r + 1) * cols]), dim=1) for r in range(rows)], dim=0)
    image = Image.fromarray(grid.numpy())
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="flowkern/assets/tiny_flow", help="output directory")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    parser.add_argument("--cfg-drop", type=float, default=0.1, help="fraction of null-prompt samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
    model = SD3FlowModel(transformer)
    transformer.requires_grad_(True)  # the adapter freezes non-LoRA weights: here we train the base itself
    ema = copy.deepcopy(transformer).requires_grad_(False)
    table = prompt_table(args.seed + 1)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    schedule = lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    data_gen = torch.Generator().manual_seed(args.seed + 2)
    n_classes = len(CLASS_NAMES)
    size = TRANSFORMER_CONFIG["sample_size"]

    start = time.perf_counter()
    running = None
    for step in range(args.steps):
        labels = torch.randint(n_classes, (args.batch_size,), generator=data_gen)
        x1 = render_shapes(labels, size, data_gen)
        x0 = torch.randn(x1.shape, generator=data_gen)
        t = torch.rand(args.batch_size, generator=data_gen)
        drop = torch.rand(args.batch_size, generator=data_gen) < args.cfg_drop
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * x1  # (M1)
        v = model.velocity(xt, t, conditioning(table, labels, drop))
        loss = (v - (x1 - x0)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), transformer.parameters()):
                p_ema.lerp_(p, 1 - decay)
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 100 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}  loss {running:.4f}  {elapsed:6.0f} s", flush=True)
    wall = time.perf_counter() - start

    os.makedirs(args.out, exist_ok=True)
    ema.save_pretrained(os.path.join(args.out, "transformer"), safe_serialization=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in table.items()}, os.path.join(args.out, "prompts.safetensors"))
    info = {
        "format": "flowkern-tiny-flow/1",
        "class_names": list(CLASS_NAMES),
        "image_size": size,
        "pixel_range": [-1.0, 1.0],
        "sampling": {"num_steps": 20, "guidance_scale": 3.0, "time_grid": "uniform"},
        "training": {
            "command": "python scripts/train_tiny_flow.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "ema": args.ema,
            "cfg_drop": args.cfg_drop,
            "seed": args.seed,
            "threads": args.threads,
            "final_loss_ema": running,
            "wall_time_s": round(wall, 1),
            "torch": torch.__version__,
        },
    }
    with open(os.path.join(args.out, "flowkern_tiny.json"), "w") as f:
        json.dump(info, f, indent=2)
    ema_model = SD3FlowModel(ema)
    labels = torch.arange(n_classes).repeat_interleave(8)
    images = sample(ema_model, table, labels, 20, 3.0, torch.Generator().manual_seed(123))
    save_grid(images, n_classes, os.path.join(args.out, "samples.png"))
    print(f"wrote {args.out} in {wall:.0f} s of training", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
