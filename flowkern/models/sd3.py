"""`FlowModel` adapter for diffusers' `SD3Transformer2DModel` (SD3 / SD3.5).

This is the only place the diffusers convention is converted (M3): paper time t (t=0 noise, t=1
data, M1) maps to sigma = 1 - t and ``timestep`` = 1000 sigma; the velocity is v = -noise_pred.
CFG (M5) runs the unconditional and conditional branches as one [2B] batch, uncond first, and
combines v = v_u + w (v_c - v_u) exactly as `flowkern.ops.cfg_euler` does.

Dtypes: the transformer may hold bf16 weights; states, embeddings and the returned velocity keep
the caller's dtype (inputs are cast to the weights' dtype for the call, the output back), the
timestep is passed in fp32 (1000 sigma in bf16 would lose ~3 significant digits), and LoRA
parameters are fp32 (`flowkern.models.lora.add_lora`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flowkern.models._adapter import TransformerFlowModel

__all__ = ["SD3Conditioning", "SD3FlowModel", "sd3_timestep"]


def sd3_timestep(t: torch.Tensor | float, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """diffusers' SD3 ``timestep`` [B] (fp32) for paper time ``t`` (0-dim or [B]): 1000 (1 - t) (M3)."""
    t = torch.as_tensor(t, device=device)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"t must be 0-dim or [B] with B={batch}, got shape {tuple(t.shape)}")
    sigma = 1.0 - t.to(torch.float64)  # (M3) sigma = 1 - t, formed in fp64, passed in fp32 (differentiable in t)
    return (1000.0 * sigma).to(torch.float32).reshape(-1).expand(batch)


@dataclass
class SD3Conditioning:
    """Text conditioning of an SD3 transformer, as `StableDiffusion3Pipeline.encode_prompt` returns it.

    ``prompt_embeds`` [B, L, joint_attention_dim], ``pooled_prompt_embeds`` [B, pooled_projection_dim].
    CFG (M5): set ``guidance_scale`` w and the negative embeddings (the encoded negative prompt, "" in
    the stock pipeline; same shapes). ``guidance_scale=None`` is the plain conditional velocity.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        pe, pp = self.prompt_embeds, self.pooled_prompt_embeds
        if not isinstance(pe, torch.Tensor) or pe.dim() != 3:
            raise ValueError(f"prompt_embeds must be a [B, L, D] tensor, got {_shape(pe)}")
        if not isinstance(pp, torch.Tensor) or pp.dim() != 2 or pp.shape[0] != pe.shape[0]:
            raise ValueError(f"pooled_prompt_embeds must be [B, D] with B={pe.shape[0]}, got {_shape(pp)}")
        if self.guidance_scale is None:
            return
        self.guidance_scale = float(self.guidance_scale)
        ne, np_ = self.negative_prompt_embeds, self.negative_pooled_prompt_embeds
        if ne is None or np_ is None:
            raise ValueError(
                "guidance_scale is set: pass negative_prompt_embeds and negative_pooled_prompt_embeds "
                "(the encoded negative prompt; the stock pipeline encodes '')"
            )
        if ne.shape != pe.shape or np_.shape != pp.shape:
            raise ValueError(
                f"negative embeddings must match the prompt's shapes {tuple(pe.shape)}, {tuple(pp.shape)}; "
                f"got {tuple(ne.shape)}, {tuple(np_.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def cfg(self) -> bool:
        return self.guidance_scale is not None

    def tensors(self) -> list[torch.Tensor]:
        values = [self.prompt_embeds, self.pooled_prompt_embeds]
        values += [self.negative_prompt_embeds, self.negative_pooled_prompt_embeds]
        return [v for v in values if isinstance(v, torch.Tensor)]

    def branch(self, uncond: bool) -> dict[str, torch.Tensor]:
        """One branch's [B] inputs (the negative prompt for ``uncond``)."""
        if uncond and not self.cfg:
            raise ValueError("the unconditional branch needs guidance_scale and the negative embeddings")
        if uncond:
            return {"prompt_embeds": self.negative_prompt_embeds, "pooled": self.negative_pooled_prompt_embeds}
        return {"prompt_embeds": self.prompt_embeds, "pooled": self.pooled_prompt_embeds}

    def cfg_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[2B] (prompt_embeds, pooled) for the CFG batch, uncond first (M5)."""
        if not self.cfg:
            raise ValueError("cfg_embeds() needs guidance_scale")
        return (
            torch.cat([self.negative_prompt_embeds, self.prompt_embeds]),
            torch.cat([self.negative_pooled_prompt_embeds, self.pooled_prompt_embeds]),
        )


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


class SD3FlowModel(TransformerFlowModel):
    """`FlowModel` over an `SD3Transformer2DModel` (optionally with a peft LoRA), paper convention (M1, M3).

    ``velocity(x, t, cond)``: x [B, C, H, W] latents, t 0-dim or [B], ``cond`` an `SD3Conditioning`; the
    CFG-combined v (M5) in x's dtype. Loading, LoRA, ``base_velocity()``, ``velocity_pair`` and ``branches``
    come from `flowkern.models._adapter.TransformerFlowModel`, shared with FLUX, FLUX.2 and SiT.
    """

    transformer_class = "SD3Transformer2DModel"
    conditioning_type = SD3Conditioning

    def _check_state(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be latents [B, C, H, W], got {_shape(x)}")

    def _forward(
        self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, torch.Tensor], call: Callable[..., Any]
    ) -> torch.Tensor:
        """v = -transformer(x, timestep=1000 (1 - t)) (M3), in x's dtype."""
        dtype = self.dtype
        noise_pred = call(
            hidden_states=x.to(dtype),
            encoder_hidden_states=inputs["prompt_embeds"].to(device=x.device, dtype=dtype),
            pooled_projections=inputs["pooled"].to(device=x.device, dtype=dtype),
            timestep=sd3_timestep(t, x.shape[0], x.device),
        )
        return -noise_pred.to(x.dtype)  # (M3) v = -noise_pred
