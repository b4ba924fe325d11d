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

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flowkern.models.lora import DEFAULT_TARGETS, add_lora, has_lora, load_lora, lora_parameters

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


class SD3FlowModel(nn.Module):
    """`FlowModel` over an `SD3Transformer2DModel` (optionally with a peft LoRA), paper convention (M1, M3).

    - ``velocity(x, t, cond)``: x [B, C, H, W] latents, t 0-dim or [B], ``cond`` an `SD3Conditioning`;
      returns the CFG-combined v (M5) in x's dtype.
    - ``velocity_pair(x, t, cond)``: (v_u, v_c) from the [2B] batch, for samplers that combine CFG
      themselves (`flowkern.sampling.sample_euler(..., guidance_scale=w)`).
    - ``branches(x2, t, cond)``: [2B] states -> [v_u; v_c] (the form the lean adjoint uses for CFG).
    - ``base_velocity()``: LoRA off (peft ``disable_adapters``/``enable_adapters``, try/finally).
    - ``trainable_parameters()``: the LoRA parameters (fp32).
    """

    def __init__(self, transformer: nn.Module, *, gradient_checkpointing: bool = False):
        super().__init__()
        self.transformer = transformer.eval()
        for name, p in self.transformer.named_parameters():
            if "lora_" not in name:
                p.requires_grad_(False)
        self.set_gradient_checkpointing(gradient_checkpointing)

    # ------------------------------------------------------------------ loading / LoRA
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = "transformer",
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool = False,
        device: torch.device | str | None = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = DEFAULT_TARGETS,
        lora_path: str | os.PathLike | None = None,
        gradient_checkpointing: bool = False,
        **kwargs,
    ) -> SD3FlowModel:
        """Load the transformer from a local pipeline/transformer directory or a hub id (diffusers'
        `SD3Transformer2DModel.from_pretrained`; ``subfolder=None`` for a bare transformer directory).

        ``torch_dtype`` sets the frozen weights' dtype (e.g. bf16); with ``lora_rank`` a LoRA is attached
        with fp32 parameters, and ``lora_path`` (a `save_lora` directory/file) then loads its weights.
        Extra ``kwargs`` go to diffusers' ``from_pretrained`` (``revision``, ``cache_dir``, ...).
        """
        from diffusers import SD3Transformer2DModel

        if subfolder is not None:
            kwargs["subfolder"] = subfolder
        transformer = SD3Transformer2DModel.from_pretrained(
            pretrained_model_name_or_path, torch_dtype=torch_dtype, local_files_only=local_files_only, **kwargs
        )
        if device is not None:
            transformer = transformer.to(device)
        if lora_path is not None and lora_rank is None:
            raise ValueError("lora_path needs lora_rank (and lora_alpha if it differs from the rank)")
        model = cls(transformer, gradient_checkpointing=gradient_checkpointing)
        if lora_rank is not None:
            model.add_lora(lora_rank, lora_alpha, lora_target_modules)
            if lora_path is not None:
                load_lora(model.transformer, lora_path)
        return model

    def add_lora(
        self, rank: int, alpha: float | None = None, target_modules: Sequence[str] = DEFAULT_TARGETS, **kwargs
    ) -> list[nn.Parameter]:
        """Attach a peft LoRA with fp32 parameters (see `flowkern.models.lora.add_lora`)."""
        return add_lora(self.transformer, rank, alpha, target_modules, **kwargs)

    def save_lora(self, path: str | os.PathLike, **kwargs) -> str:
        """Write the LoRA in the format stock `StableDiffusion3Pipeline.load_lora_weights` reads."""
        from flowkern.models.lora import save_lora

        return save_lora(self.transformer, path, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in lora_parameters(self.transformer) if p.requires_grad]

    def set_gradient_checkpointing(self, enabled: bool, gradient_checkpointing_func: Callable | None = None) -> None:
        """Switch diffusers' per-block gradient checkpointing (``fn(module, *args)``, active only under grad)."""
        if enabled:
            self.transformer.enable_gradient_checkpointing(gradient_checkpointing_func=gradient_checkpointing_func)
        elif getattr(self.transformer, "gradient_checkpointing", False):
            self.transformer.disable_gradient_checkpointing()

    @contextlib.contextmanager
    def base_velocity(self) -> Iterator[None]:
        """Inside, ``velocity`` is the frozen base model (LoRA off); restored on exit, even on error."""
        if not has_lora(self.transformer):
            yield
            return
        was_enabled = self._adapters_enabled()
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            if was_enabled:
                self.transformer.enable_adapters()

    def _adapters_enabled(self) -> bool:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)]
        return any(not m.disable_adapters for m in layers)

    # ------------------------------------------------------------------ velocities
    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for n, p in self.transformer.named_parameters() if "lora_" not in n)

    def _call(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """v = -transformer(x, timestep=1000 (1 - t)) (M3), in x's dtype."""
        dtype = self.dtype
        kwargs = dict(
            hidden_states=x.to(dtype),
            encoder_hidden_states=embeds.to(device=x.device, dtype=dtype),
            pooled_projections=pooled.to(device=x.device, dtype=dtype),
            timestep=sd3_timestep(t, x.shape[0], x.device),
            return_dict=False,
        )
        if params is None:
            noise_pred = self.transformer(**kwargs)[0]
        else:
            noise_pred = torch.func.functional_call(self.transformer, params, (), kwargs, strict=False)[0]
        return -noise_pred.to(x.dtype)  # (M3) v = -noise_pred

    @staticmethod
    def _check(x: torch.Tensor, cond: SD3Conditioning) -> None:
        if not isinstance(cond, SD3Conditioning):
            raise TypeError(f"cond must be an SD3Conditioning, got {type(cond).__name__}")
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be latents [B, C, H, W], got {_shape(x)}")
        if x.shape[0] != cond.batch_size:
            raise ValueError(f"x has batch {x.shape[0]} but cond has batch {cond.batch_size}")

    @staticmethod
    def _t2(t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t)
        return torch.cat([t, t]) if t.dim() == 1 else t

    def branches(self, x2: torch.Tensor, t: torch.Tensor, cond: SD3Conditioning) -> torch.Tensor:
        """[2B] states (uncond half first) -> [v_u; v_c] [2B] (M5)."""
        if not isinstance(cond, SD3Conditioning) or not cond.cfg:
            raise ValueError("branches() needs an SD3Conditioning with guidance_scale (CFG)")
        if x2.dim() != 4 or x2.shape[0] != 2 * cond.batch_size:
            raise ValueError(f"x2 must be [2B, C, H, W] with B={cond.batch_size}, got {_shape(x2)}")
        embeds, pooled = cond.cfg_embeds()
        return self._call(x2, self._t2(t), embeds, pooled)

    def velocity_pair(
        self, x: torch.Tensor, t: torch.Tensor, cond: SD3Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_u, v_c), both [B, ...], from one [2B] batch (uncond first)."""
        self._check(x, cond)
        v_u, v_c = self.branches(torch.cat([x, x]), t, cond).chunk(2)
        return v_u, v_c

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, cond: SD3Conditioning, *, detach_uncond: bool = False
    ) -> torch.Tensor:
        """The (CFG-combined, M5) velocity in paper time.

        ``detach_uncond`` (M5): the *parameter* path of v_u is detached, the state path is kept, so
        d v/d theta = w dv_c/d theta while d v/d x = (1 - w) J_u + w J_c. When x (and the embeddings)
        carry no gradient, this is the [2B] batch with v_u detached (v_u then depends on nothing
        else); otherwise v_u is recomputed with the trainable parameters detached (two B-batches).
        """
        self._check(x, cond)
        if not cond.cfg:
            return self._call(x, t, cond.prompt_embeds, cond.pooled_prompt_embeds)
        w = cond.guidance_scale
        needs_state_grad = any(
            isinstance(v, torch.Tensor) and v.requires_grad
            for v in (x, t, cond.prompt_embeds, cond.pooled_prompt_embeds)
        ) or any(v.requires_grad for v in (cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds))
        if detach_uncond and torch.is_grad_enabled() and needs_state_grad:
            frozen = {n: p.detach() for n, p in self.transformer.named_parameters() if p.requires_grad}
            v_u = self._call(x, t, cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds, frozen)
            v_c = self._call(x, t, cond.prompt_embeds, cond.pooled_prompt_embeds)
        else:
            v_u, v_c = self.velocity_pair(x, t, cond)
            if detach_uncond:
                v_u = v_u.detach()
        return v_u + w * (v_c - v_u)  # (M5), the combine of ops.cfg_euler

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: SD3Conditioning) -> torch.Tensor:
        return self.velocity(x, t, cond)
