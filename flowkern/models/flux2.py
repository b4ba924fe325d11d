"""`FlowModel` adapter for diffusers' `Flux2Transformer2DModel` (FLUX.2 dev / Klein).

The only place FLUX.2's conventions are converted (M1, M3), checked against diffusers 0.42.1's `Flux2Pipeline`
and `Flux2KleinPipeline`:

- **State**: x is the pipeline's ``latents`` [B, C, h, w], C = in_channels (128 for FLUX.2: the 32-channel VAE
  latent, 2x2-patchified and batch-normalised by the VAE's running statistics; `flowkern.models.vae` undoes
  both). The transformer sees one token per position: [B, C, h, w] -> [B, h w, C] (`pack_latents` with
  patch 1, shared with FLUX.1).
- **Positions**: ``img_ids`` [h w, 4] = (t=0, row, col, l=0), ``txt_ids`` [L, 4] = (0, 0, 0, l).
- **Time**: sigma = 1 - t, ``timestep`` = sigma in [0, 1] (fp32); the transformer multiplies by 1000.
- **Sign**: v = -noise_pred.
- **Embedded guidance**: FLUX.2-dev (``guidance_embeds=True``) takes ``guidance`` = the pipeline's
  ``guidance_scale`` (e.g. 4.0), [B] fp32; Klein (``guidance_embeds=False``) takes none.
- **True CFG** (optional, M5; `Flux2KleinPipeline`'s ``guidance_scale`` for non-distilled Klein):
  ``Flux2Conditioning.guidance_scale`` = w with ``negative_prompt_embeds``; batched [2B], uncond first.

Text conditioning: ``prompt_embeds`` [B, L, joint_attention_dim] (Mistral / Qwen3 hidden states; no pooled
vector). LoRA targets: to_q/to_k/to_v/to_out.0 of the double-stream blocks and the fused
``to_qkv_mlp_proj`` of the single-stream blocks; `save_lora` writes the file ``Flux2Pipeline`` /
``Flux2KleinPipeline.load_lora_weights`` (both `Flux2LoraLoaderMixin`) read.
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
from flowkern.models.flux import _guidance_tensor, check_guidance, image_position_ids, pack_latents, unpack_latents
from flowkern.models.lora import DEFAULT_TARGETS

__all__ = ["FLUX2_LORA_TARGETS", "Flux2Conditioning", "Flux2FlowModel", "text_position_ids"]

FLUX2_LORA_TARGETS = (*DEFAULT_TARGETS, "to_qkv_mlp_proj")


def text_position_ids(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[L, 4] FLUX.2 text ids (0, 0, 0, l) (`Flux2Pipeline._prepare_text_ids`)."""
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device, dtype=torch.float32)
    return ids


@dataclass
class Flux2Conditioning:
    """Text conditioning of a FLUX.2 transformer: ``prompt_embeds`` [B, L, joint_attention_dim].

    ``guidance``: the embedded guidance of FLUX.2-dev (float or [B]); None for Klein. True CFG (M5):
    ``guidance_scale`` w with ``negative_prompt_embeds`` (same shape).
    """

    prompt_embeds: torch.Tensor
    guidance: float | torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        pe = check_tensor("prompt_embeds", self.prompt_embeds, 3)
        self.guidance = check_guidance(self.guidance, pe.shape[0])
        self.guidance_scale = check_guidance_scale(self.guidance_scale)
        if self.guidance_scale is None:
            return
        ne = self.negative_prompt_embeds
        if not isinstance(ne, torch.Tensor):
            raise ValueError("guidance_scale (true CFG, w) is set: pass negative_prompt_embeds (same shape)")
        if ne.shape != pe.shape:
            raise ValueError(
                f"negative_prompt_embeds must match prompt_embeds {tuple(pe.shape)}, got {tuple(ne.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def cfg(self) -> bool:
        return self.guidance_scale is not None

    def tensors(self) -> list[torch.Tensor]:
        values = [self.prompt_embeds, self.guidance, self.negative_prompt_embeds]
        return [v for v in values if isinstance(v, torch.Tensor)]

    def branch(self, uncond: bool) -> dict[str, torch.Tensor]:
        if uncond and not self.cfg:
            raise ValueError("the unconditional branch needs guidance_scale and negative_prompt_embeds")
        out = {"prompt_embeds": self.negative_prompt_embeds if uncond else self.prompt_embeds}
        if self.guidance is not None:
            out["guidance"] = _guidance_tensor(self.guidance, self.batch_size)
        return out


class Flux2FlowModel(TransformerFlowModel):
    """`FlowModel` over a `Flux2Transformer2DModel` (optionally with a peft LoRA), paper convention (M1, M3).

    x: the pipeline's latents [B, in_channels, h, w]; ``cond`` a `Flux2Conditioning`.
    """

    transformer_class = "Flux2Transformer2DModel"
    conditioning_type = Flux2Conditioning
    default_lora_targets = FLUX2_LORA_TARGETS

    def __init__(self, transformer: torch.nn.Module, *, gradient_checkpointing: bool = False):
        super().__init__(transformer, gradient_checkpointing=gradient_checkpointing)
        config = self.transformer.config
        if (config.out_channels or config.in_channels) != config.in_channels:
            raise ValueError(f"Flux2FlowModel needs out_channels = in_channels, got {config.out_channels}")

    def _check_state(self, x: torch.Tensor) -> None:
        c = self.transformer.config.in_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"x must be FLUX.2 latents [B, {c}, h, w] (the pipeline's latents), got {shape_of(x)}")

    def _check_cond(self, cond: Flux2Conditioning) -> None:
        config = self.transformer.config
        check_last_dim("prompt_embeds", cond.prompt_embeds, config, "joint_attention_dim")
        if config.guidance_embeds and cond.guidance is None:
            raise ValueError(
                "this FLUX.2 transformer embeds guidance (guidance_embeds=True, FLUX.2-dev): pass "
                "Flux2Conditioning(guidance=...) (the pipeline's guidance_scale)"
            )
        if not config.guidance_embeds and cond.guidance is not None:
            raise ValueError("this FLUX.2 transformer has no guidance embedding (Klein): guidance=None")

    def _forward(
        self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, torch.Tensor], call: Callable[..., Any]
    ) -> torch.Tensor:
        """v = -unpack(transformer(pack(x), timestep = 1 - t)) (M3)."""
        dtype, device = self.dtype, x.device
        _, _, h, w = x.shape
        embeds = inputs["prompt_embeds"].to(device=device, dtype=dtype)
        kwargs = dict(
            hidden_states=pack_latents(x.to(dtype), patch_size=1),
            encoder_hidden_states=embeds,
            timestep=(1.0 - t).to(torch.float32),  # (M3) sigma = 1 - t; FLUX.2 multiplies by 1000 internally
            img_ids=image_position_ids(h, w, 4, device),
            txt_ids=text_position_ids(embeds.shape[1], device),
        )
        if "guidance" in inputs:
            kwargs["guidance"] = inputs["guidance"].to(device)
        noise_pred = unpack_latents(call(**kwargs), h, w, patch_size=1)
        return -noise_pred.to(x.dtype)  # (M3) v = -noise_pred
