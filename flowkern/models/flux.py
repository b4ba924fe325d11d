"""`FlowModel` adapter for diffusers' `FluxTransformer2DModel` (FLUX.1 dev/schnell).

The only place FLUX's conventions are converted (M1, M3), checked against diffusers 0.42.1's `FluxPipeline`:

- **State**: the sampler state x is the *unpacked* latent [B, C, H, W] (C = in_channels / 4, 16 for FLUX.1),
  so methods and ops see image-shaped tensors. The transformer sees 2x2 patches as tokens:
  [B, C, H, W] -> [B, (H/2)(W/2), 4C], channel order (c, dy, dx), tokens row-major (`pack_latents`, as
  `FluxPipeline._pack_latents`); H and W must be even.
- **Positions**: ``img_ids`` [(H/2)(W/2), 3] = (0, row, col) of each patch, ``txt_ids`` = zeros [L, 3].
- **Time**: sigma = 1 - t; ``timestep`` = sigma in [0, 1] (fp32). The pipeline passes ``timestep / 1000`` and
  the transformer multiplies by 1000 itself, unlike SD3 where ``timestep`` = 1000 sigma.
- **Sign**: v = -noise_pred (the flow-match scheduler steps x += (sigma' - sigma) noise_pred).
- **Distilled guidance** (FLUX.1-dev, ``guidance_embeds=True``): ``guidance`` = the embedded guidance scale
  (the pipeline's ``guidance_scale``, e.g. 3.5; the transformer multiplies it by 1000), [B] fp32, the same in
  both CFG branches. Required for such transformers, rejected for schnell-style ones.
- **True CFG** (optional, M5; the pipeline's ``true_cfg_scale``): ``FluxConditioning.guidance_scale`` = w with
  the negative embeddings; batched as [2B], uncond first (the pipeline makes two calls; same values).

Text conditioning (``FluxPipeline.encode_prompt``): T5 ``prompt_embeds`` [B, L, joint_attention_dim] and CLIP
``pooled_prompt_embeds`` [B, pooled_projection_dim]. LoRA targets to_q/to_k/to_v (double and single blocks)
and to_out.0 (double blocks; single blocks have no attention output projection); the file `save_lora` writes
loads into a stock ``FluxPipeline.load_lora_weights``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flowkern.models._adapter import (
    TransformerFlowModel,
    check_guidance_scale,
    check_last_dim,
    check_tensor,
    shape_of,
)

__all__ = [
    "FluxConditioning",
    "FluxFlowModel",
    "check_guidance",
    "image_position_ids",
    "pack_latents",
    "unpack_latents",
]


# ---------------------------------------------------------------------- packing (shared with FLUX.2 and the VAE)
def pack_latents(x: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p^2] tokens: p x p patches, channel order (c, dy, dx), row-major tokens.

    p = 2 is FLUX.1's packing (`FluxPipeline._pack_latents`); p = 1 is FLUX.2's (`Flux2Pipeline._pack_latents`),
    and FLUX.2's 2x2 VAE patchify followed by its packing equals p = 2 here.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"latents must be [B, C, H, W], got {shape_of(x)}")
    b, c, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent height and width must be divisible by the patch size {p}, got {h}x{w}")
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, patch_size: int = 2) -> torch.Tensor:
    """Inverse of `pack_latents`: [B, (H/p)(W/p), C p^2] -> [B, C, H, W] for latent ``height`` x ``width``."""
    p = patch_size
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, D], got {shape_of(tokens)}")
    b, n, d = tokens.shape
    if height % p or width % p or n != (height // p) * (width // p) or d % (p * p):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not pack a {height}x{width} latent in {p}x{p} patches")
    x = tokens.reshape(b, height // p, width // p, d // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // (p * p), height, width)


def image_position_ids(
    rows: int, cols: int, n_axes: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[rows * cols, n_axes] rotary position ids of the image tokens: axis 1 = row, axis 2 = col, others 0.

    n_axes = 3 gives FLUX.1's (0, row, col); n_axes = 4 FLUX.2's (t=0, row, col, l=0).
    """
    ids = torch.zeros(rows, cols, n_axes, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, n_axes)


def check_guidance(value: object, batch: int) -> float | torch.Tensor | None:
    """The embedded (distilled) guidance: None, a finite float, or a 0-dim / [B] floating tensor."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch) or not value.is_floating_point():
            raise ValueError(f"guidance must be a float or a 0-dim / [B={batch}] floating tensor, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"guidance must be a float or a 0-dim / [B={batch}] tensor, got {value!r}")
    return float(value)


def _guidance_tensor(guidance: float | torch.Tensor, batch: int) -> torch.Tensor:
    return torch.as_tensor(guidance, dtype=torch.float32).reshape(-1).expand(batch).to(torch.float32)


# ---------------------------------------------------------------------- conditioning
@dataclass
class FluxConditioning:
    """Text conditioning of a FLUX.1 transformer, as `FluxPipeline.encode_prompt` returns it.

    ``prompt_embeds`` [B, L, joint_attention_dim] (T5), ``pooled_prompt_embeds`` [B, pooled_projection_dim]
    (CLIP). ``guidance``: the embedded guidance of guidance-distilled transformers (FLUX.1-dev; the pipeline's
    ``guidance_scale``), a float or [B] tensor. True CFG (M5): ``guidance_scale`` w (the pipeline's
    ``true_cfg_scale``) with the negative embeddings (same shapes); None is the plain conditional velocity.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    guidance: float | torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        pe = check_tensor("prompt_embeds", self.prompt_embeds, 3)
        check_tensor("pooled_prompt_embeds", self.pooled_prompt_embeds, 2, pe.shape[0])
        self.guidance = check_guidance(self.guidance, pe.shape[0])
        self.guidance_scale = check_guidance_scale(self.guidance_scale)
        if self.guidance_scale is None:
            return
        ne, np_ = self.negative_prompt_embeds, self.negative_pooled_prompt_embeds
        if ne is None or np_ is None:
            raise ValueError(
                "guidance_scale (true CFG, w) is set: pass negative_prompt_embeds and negative_pooled_prompt_embeds; "
                "FLUX.1-dev's embedded guidance goes in guidance="
            )
        if not isinstance(ne, torch.Tensor) or not isinstance(np_, torch.Tensor):
            raise ValueError("negative_prompt_embeds and negative_pooled_prompt_embeds must be tensors")
        if ne.shape != pe.shape or np_.shape != self.pooled_prompt_embeds.shape:
            raise ValueError(
                f"negative embeddings must match the prompt's shapes {tuple(pe.shape)}, "
                f"{tuple(self.pooled_prompt_embeds.shape)}; got {tuple(ne.shape)}, {tuple(np_.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def cfg(self) -> bool:
        return self.guidance_scale is not None

    def tensors(self) -> list[torch.Tensor]:
        values = [self.prompt_embeds, self.pooled_prompt_embeds, self.guidance]
        values += [self.negative_prompt_embeds, self.negative_pooled_prompt_embeds]
        return [v for v in values if isinstance(v, torch.Tensor)]

    def branch(self, uncond: bool) -> dict[str, torch.Tensor]:
        """One branch's [B] inputs (the negative prompt for ``uncond``); the guidance is shared."""
        if uncond and not self.cfg:
            raise ValueError("the unconditional branch needs guidance_scale and the negative embeddings")
        out = {
            "prompt_embeds": self.negative_prompt_embeds if uncond else self.prompt_embeds,
            "pooled": self.negative_pooled_prompt_embeds if uncond else self.pooled_prompt_embeds,
        }
        if self.guidance is not None:
            out["guidance"] = _guidance_tensor(self.guidance, self.batch_size)
        return out


# ---------------------------------------------------------------------- adapter
class FluxFlowModel(TransformerFlowModel):
    """`FlowModel` over a `FluxTransformer2DModel` (optionally with a peft LoRA), paper convention (M1, M3).

    x: unpacked latents [B, C, H, W] with C = in_channels / 4 and even H, W; ``cond`` a `FluxConditioning`.
    See `flowkern.models._adapter.TransformerFlowModel` for velocity / velocity_pair / branches /
    base_velocity / from_pretrained (``FluxFlowModel.from_pretrained(dir_or_hub_id, torch_dtype=torch.bfloat16,
    lora_rank=16)``).
    """

    transformer_class = "FluxTransformer2DModel"
    conditioning_type = FluxConditioning

    def __init__(self, transformer: torch.nn.Module, *, gradient_checkpointing: bool = False):
        super().__init__(transformer, gradient_checkpointing=gradient_checkpointing)
        config = self.transformer.config
        if config.in_channels % 4 or (config.out_channels or config.in_channels) != config.in_channels:
            raise ValueError(
                "FluxFlowModel needs in_channels = 4 x latent channels and out_channels = in_channels, got "
                f"in_channels={config.in_channels}, out_channels={config.out_channels}"
            )

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def _check_state(self, x: torch.Tensor) -> None:
        c = self.latent_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"x must be unpacked FLUX latents [B, {c}, H, W], got {shape_of(x)}")
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"x's height and width must be even (2x2 packing), got {x.shape[2]}x{x.shape[3]}")

    def _check_cond(self, cond: FluxConditioning) -> None:
        config = self.transformer.config
        check_last_dim("prompt_embeds", cond.prompt_embeds, config, "joint_attention_dim")
        check_last_dim("pooled_prompt_embeds", cond.pooled_prompt_embeds, config, "pooled_projection_dim")
        if config.guidance_embeds and cond.guidance is None:
            raise ValueError(
                "this FLUX transformer is guidance-distilled (guidance_embeds=True, FLUX.1-dev): pass "
                "FluxConditioning(guidance=...) (the pipeline's guidance_scale, e.g. 3.5)"
            )
        if not config.guidance_embeds and cond.guidance is not None:
            raise ValueError("this FLUX transformer has no guidance embedding (guidance_embeds=False): guidance=None")

    def _forward(
        self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, torch.Tensor], call: Callable[..., Any]
    ) -> torch.Tensor:
        """v = -unpack(transformer(pack(x), timestep = 1 - t)) (M3)."""
        dtype, device = self.dtype, x.device
        b, _, h, w = x.shape
        embeds = inputs["prompt_embeds"].to(device=device, dtype=dtype)
        kwargs = dict(
            hidden_states=pack_latents(x.to(dtype)),
            encoder_hidden_states=embeds,
            pooled_projections=inputs["pooled"].to(device=device, dtype=dtype),
            timestep=(1.0 - t).to(torch.float32),  # (M3) sigma = 1 - t; FLUX multiplies by 1000 internally
            img_ids=image_position_ids(h // 2, w // 2, 3, device),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device),
        )
        if "guidance" in inputs:
            kwargs["guidance"] = inputs["guidance"].to(device)
        noise_pred = unpack_latents(call(**kwargs), h, w)
        return -noise_pred.to(x.dtype)  # (M3) v = -noise_pred
