"""Frozen transformer weight bytes with a bf16, int8 or fp8 base (flowkern.models.quantize), from configs on the meta
device: nothing is materialised, so the real sizes cost nothing. ``python benchmarks/quantized_weights.py``.

The configs are written from the published models' descriptions, not read from the hub (no downloads): FLUX.1-dev
(19 double + 38 single blocks, 24 x 128 heads, T5 4096 / CLIP 768, embedded guidance) and FLUX.2-Klein-4B (5 double +
20 single blocks, 24 x 128 heads, Qwen3-4B features 3 x 2560, 128 latent channels, mlp ratio 3, no guidance embedding).
The printed parameter counts (11.90 B and 3.88 B) are the check that they are the 12 B and 4 B models.
"""

from __future__ import annotations

import torch

FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))  # fmt: skip
FLUX2_KLEIN_4B = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                      num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                      axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False)  # fmt: skip


def main() -> None:
    import diffusers

    from flowkern.models.quantize import BASE_PRECISIONS, quantized_weight_bytes

    models = (("FLUX.1-dev", diffusers.FluxTransformer2DModel, FLUX1_DEV),
              ("FLUX.2-Klein-4B", diffusers.Flux2Transformer2DModel, FLUX2_KLEIN_4B))  # fmt: skip
    for name, cls, config in models:
        with torch.device("meta"):
            model = cls(**config)
        params = sum(p.numel() for p in model.parameters())
        sizes = ", ".join(f"{p} {quantized_weight_bytes(model, p) / 2**30:.2f} GiB" for p in BASE_PRECISIONS)
        print(f"{name}: {params / 1e9:.2f} B parameters; frozen weights {sizes}")


if __name__ == "__main__":
    main()
