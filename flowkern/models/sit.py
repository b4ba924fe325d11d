"""`FlowModel` adapter for SiT: a class-conditional transformer trained with flow matching, built on diffusers'
`DiTTransformer2DModel` (the DiT architecture SiT shares: patch embedding, adaLN-Zero blocks, label table
with a null row).

Convention (SiT, Ma et al. 2024, "Linear" interpolant: x_t = t x_data + (1 - t) noise, velocity target
x_data - noise) — this is already paper time (M1), so the conversion is only:

- **State**: latents [B, C, H, W], square (DiT's unpatchify assumes H = W), H divisible by patch_size.
- **Time**: ``timestep`` = ``timestep_scale`` * t (fp32), t=0 noise, t=1 data, *no* sigma flip. SiT feeds
  t in [0, 1] straight into its sinusoidal embedding, so ``timestep_scale`` = 1 (default) for SiT weights; a
  model trained with ``timestep`` = 1000 t uses 1000.
- **Sign**: v = output, no sign flip (SiT predicts the velocity, unlike diffusers' flow-match noise_pred).
  With ``out_channels`` = 2 ``in_channels`` (DiT/SiT ``learn_sigma=True``) the first C channels are the
  velocity and the rest is dropped, as SiT's own ``forward`` does.
- **Classes**: labels in [0, num_classes) with num_classes = ``num_embeds_ada_norm``; the label table's extra
  row ``num_classes`` is the null class used for the unconditional CFG branch (M5), as in DiT/SiT.

LoRA: peft directly (DiT has no diffusers peft mixin) on the attention projections
to_q/to_k/to_v/to_out.0 of ``attn1``; `save_lora` writes diffusers' LoRA file layout (no stock pipeline loads
LoRA into DiT; `flowkern.models.lora.load_lora` reads it back).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flowkern.models._adapter import TransformerFlowModel, check_guidance_scale, shape_of

__all__ = ["SiTConditioning", "SiTFlowModel"]


@dataclass
class SiTConditioning:
    """Class conditioning: ``labels`` [B] integer class ids; CFG (M5) with ``guidance_scale`` w against the null
    class (None: plain conditional velocity)."""

    labels: torch.Tensor
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        labels = self.labels
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ValueError(f"labels must be a [B] tensor of class ids, got {shape_of(labels)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor (class ids), got {labels.dtype}")
        self.guidance_scale = check_guidance_scale(self.guidance_scale)

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    @property
    def cfg(self) -> bool:
        return self.guidance_scale is not None

    def tensors(self) -> list[torch.Tensor]:
        return []  # integer labels carry no gradient


class SiTFlowModel(TransformerFlowModel):
    """`FlowModel` over a class-conditional `DiTTransformer2DModel` used as a SiT velocity model (M1).

    ``timestep_scale``: ``timestep`` = timestep_scale * t (1 for SiT checkpoints). ``cond``: a `SiTConditioning`.
    """

    transformer_class = "DiTTransformer2DModel"
    conditioning_type = SiTConditioning

    def __init__(
        self, transformer: torch.nn.Module, *, timestep_scale: float = 1.0, gradient_checkpointing: bool = False
    ):
        super().__init__(transformer, gradient_checkpointing=gradient_checkpointing)
        if isinstance(timestep_scale, bool) or not isinstance(timestep_scale, int | float):
            raise ValueError(f"timestep_scale must be a positive float, got {timestep_scale!r}")
        if not (math.isfinite(timestep_scale) and timestep_scale > 0):
            raise ValueError(f"timestep_scale must be a positive float, got {timestep_scale!r}")
        self.timestep_scale = float(timestep_scale)
        config = self.transformer.config
        out = config.out_channels or config.in_channels
        if out not in (config.in_channels, 2 * config.in_channels):
            raise ValueError(
                f"SiTFlowModel needs out_channels = in_channels (or 2 in_channels, learn_sigma), got {out} "
                f"for in_channels={config.in_channels}"
            )

    @property
    def num_classes(self) -> int:
        """Number of real classes; the label id ``num_classes`` is the null class (CFG)."""
        return int(self.transformer.config.num_embeds_ada_norm)

    def _check_state(self, x: torch.Tensor) -> None:
        config = self.transformer.config
        c, p = config.in_channels, config.patch_size
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"x must be latents [B, {c}, H, W], got {shape_of(x)}")
        if x.shape[2] != x.shape[3] or x.shape[2] % p:
            raise ValueError(
                f"x must be square with a side divisible by patch_size={p} (DiT's unpatchify), "
                f"got {x.shape[2]}x{x.shape[3]}"
            )

    def _check_cond(self, cond: SiTConditioning) -> None:
        labels = cond.labels
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels must be class ids in [0, {self.num_classes}) (num_classes={self.num_classes}; "
                f"{self.num_classes} is the null class, used only for CFG), got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )

    def _branch_inputs(self, cond: SiTConditioning, uncond: bool) -> dict[str, torch.Tensor]:
        labels = torch.full_like(cond.labels, self.num_classes) if uncond else cond.labels
        return {"class_labels": labels.long()}

    def _forward(
        self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, torch.Tensor], call: Callable[..., Any]
    ) -> torch.Tensor:
        """v = transformer(x, timestep = timestep_scale * t)[:, :C] (M1; SiT's convention is paper time)."""
        out = call(
            hidden_states=x.to(self.dtype),
            timestep=(self.timestep_scale * t).to(torch.float32),
            class_labels=inputs["class_labels"].to(x.device),
        )
        return out[:, : x.shape[1]].to(x.dtype)  # learn_sigma: the extra channels are not the velocity
