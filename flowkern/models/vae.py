"""Differentiable latent -> image decoding for rewards (docs/ecosystem.md (c)): images in [0, 1].

`LatentDecoder` wraps a diffusers autoencoder and maps the *sampler state* of an adapter to pixels the way the
stock pipelines do before ``vae.decode``, then ``image = decode / 2 + 0.5`` ([-1, 1] -> [0, 1]):

- `AutoencoderKL` (SD3, FLUX.1) and `AutoencoderTiny` (TAESD3 / TAEF1): z = x / scaling_factor + shift_factor,
  both from the autoencoder's config unless given (``shift_factor`` None -> 0). FLUX.1's state is the unpacked
  latent (`flowkern.models.flux.FluxFlowModel`), so no unpacking is needed.
- `AutoencoderKLFlux2` (FLUX.2): the state is the pipeline's patchified, batch-normalised latent [B, 4C, h, w];
  z = x * sqrt(running_var + eps) + running_mean (the VAE's ``bn``), then the 2x2 un-patchify to
  [B, C, 2h, 2w] (`Flux2Pipeline`'s ``_unpatchify_latents``; here `unpack_latents(pack_latents(x, 1), 2)`).

Gradients reach the latents (no ``no_grad``, no PIL). ``clamp``: 'hard' (``clamp(0, 1)``, the pipelines'
postprocess; zero gradient on saturated pixels), 'straight_through' (clamped values, identity gradient) or
'none'. ``gradient_checkpointing`` checkpoints each decoder layer (active only under grad): the VAE decoder
backward is usually the largest activation cost at 512-1024 px.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flowkern.models._adapter import shape_of
from flowkern.models.flux import pack_latents, unpack_latents

__all__ = ["CLAMP_MODES", "LatentDecoder"]

CLAMP_MODES = ("hard", "straight_through", "none")
_KINDS = {"AutoencoderKL": "kl", "AutoencoderTiny": "tiny", "AutoencoderKLFlux2": "flux2"}


_CHECKPOINTED_LAYERS = ("ResnetBlock2D", "Attention", "Upsample2D", "AutoencoderTinyBlock")


def _checkpointed_call(forward, *args, **kwargs):
    """``forward(*args)`` under non-reentrant checkpointing when grad is on (one decoder layer)."""
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


class LatentDecoder(nn.Module):
    """latents (an adapter's state) -> images [B, 3, H, W] in [0, 1], differentiable; frozen, eval mode.

    Args:
        vae: a diffusers `AutoencoderKL`, `AutoencoderTiny` or `AutoencoderKLFlux2`.
        scaling_factor, shift_factor: override the config's (KL/Tiny only; e.g. a TAESD whose config lacks them).
        clamp: 'hard' | 'straight_through' | 'none' (see the module docstring).
        gradient_checkpointing: checkpoint each decoder layer under grad (see set_gradient_checkpointing).
    """

    def __init__(
        self,
        vae: nn.Module,
        *,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        clamp: str = "hard",
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        kind = _KINDS.get(type(vae).__name__)
        if kind is None:
            raise TypeError(
                "vae must be a diffusers AutoencoderKL, AutoencoderTiny or AutoencoderKLFlux2, "
                f"got {type(vae).__name__}"
            )
        if clamp not in CLAMP_MODES:
            raise ValueError(f"clamp must be one of {CLAMP_MODES}, got {clamp!r}")
        self.vae = vae.eval().requires_grad_(False)
        self.kind = kind
        self.clamp = clamp
        config = vae.config
        if kind == "flux2":
            if scaling_factor is not None or shift_factor is not None:
                raise ValueError(
                    "AutoencoderKLFlux2 normalises with its batch-norm statistics: no scaling/shift factor"
                )
            self.scaling_factor, self.shift_factor = 1.0, 0.0
        else:
            scale = config.scaling_factor if scaling_factor is None else scaling_factor
            shift = getattr(config, "shift_factor", None) if shift_factor is None else shift_factor
            self.scaling_factor, self.shift_factor = float(scale), float(shift or 0.0)
            if not self.scaling_factor > 0:
                raise ValueError(f"scaling_factor must be > 0, got {scale!r}")
        self.set_gradient_checkpointing(gradient_checkpointing)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = "vae",
        kind: str | None = None,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool = False,
        device: torch.device | str | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        clamp: str = "hard",
        gradient_checkpointing: bool = False,
        **kwargs,
    ) -> LatentDecoder:
        """Load the autoencoder from a local pipeline/VAE directory or a hub id (``subfolder=None`` for a bare VAE
        directory, e.g. TAESD). ``kind``: 'kl' | 'tiny' | 'flux2'; None reads ``_class_name`` from its config."""
        import diffusers

        classes = {v: k for k, v in _KINDS.items()}
        if subfolder is not None:
            kwargs["subfolder"] = subfolder
        if kind is None:
            config = diffusers.AutoencoderKL.load_config(
                pretrained_model_name_or_path, local_files_only=local_files_only, **kwargs
            )
            name = config.get("_class_name")
            if name not in _KINDS:
                raise ValueError(f"cannot decode with a {name!r}; pass kind= one of {sorted(classes)}")
            kind = _KINDS[name]
        if kind not in classes:
            raise ValueError(f"kind must be one of {sorted(classes)}, got {kind!r}")
        vae = getattr(diffusers, classes[kind]).from_pretrained(
            pretrained_model_name_or_path, torch_dtype=torch_dtype, local_files_only=local_files_only, **kwargs
        )
        if device is not None:
            vae = vae.to(device)
        return cls(
            vae,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            clamp=clamp,
            gradient_checkpointing=gradient_checkpointing,
        )

    def set_gradient_checkpointing(self, enabled: bool, gradient_checkpointing_func=None) -> None:
        """Checkpoint the decoder under grad (recomputed in the backward).

        Default: per layer, every resnet, attention and upsampler of the decoder (`_CHECKPOINTED_LAYERS`), so the
        backward holds the layers' inputs plus one layer's activations. diffusers' own checkpointing is per
        up-block, and the last up-block alone holds three full-resolution resnets' activations (SD3's VAE at
        1024 px: about 9 GiB in fp32). With ``gradient_checkpointing_func`` (``fn(module, *args)``): diffusers'
        per-block checkpointing with that function."""
        for module in self.vae.decoder.modules():  # the class's forward again (also wrappers of another decoder)
            wrapper = vars(module).get("forward")
            if isinstance(wrapper, functools.partial) and wrapper.func is _checkpointed_call:
                del module.forward
        if getattr(self.vae, "gradient_checkpointing", False) or any(
            getattr(m, "gradient_checkpointing", False) for m in self.vae.modules()
        ):
            self.vae.disable_gradient_checkpointing()
        if not enabled:
            return
        if gradient_checkpointing_func is not None:
            self.vae.enable_gradient_checkpointing(gradient_checkpointing_func=gradient_checkpointing_func)
            return
        for module in self.vae.decoder.modules():
            if type(module).__name__ in _CHECKPOINTED_LAYERS:
                module.forward = functools.partial(_checkpointed_call, module.forward)

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the decoder is checkpointed (per layer or diffusers' per block)."""
        return any(
            getattr(m, "gradient_checkpointing", False) or isinstance(vars(m).get("forward"), functools.partial)
            for m in self.vae.decoder.modules()
        )

    def train(self, mode: bool = True) -> LatentDecoder:  # frozen: always eval (no batch-norm updates)
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The autoencoder's own latent z for state ``x`` (what the stock pipeline passes to ``vae.decode``)."""
        latent_channels = self.vae.config.latent_channels
        if self.kind == "flux2":
            expected = 4 * latent_channels
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != expected:
                raise ValueError(f"latents must be FLUX.2 patchified latents [B, {expected}, h, w], got {shape_of(x)}")
            bn = self.vae.bn
            mean = bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
            std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(x.device, x.dtype)
            z = x * std + mean
            h, w = x.shape[2:]
            return unpack_latents(pack_latents(z, patch_size=1), 2 * h, 2 * w, patch_size=2)  # 2x2 un-patchify
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != latent_channels:
            raise ValueError(f"latents must be [B, {latent_channels}, H, W], got {shape_of(x)}")
        return x / self.scaling_factor + self.shift_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] (``clamp`` permitting), in the latents' dtype."""
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"latents must be a floating tensor, got {shape_of(latents)}")
        z = self.vae_latents(latents)
        decoded = self.vae.decode(z.to(self.dtype), return_dict=False)[0]
        image = decoded.to(latents.dtype) / 2 + 0.5  # [-1, 1] -> [0, 1]
        if self.clamp == "hard":
            return image.clamp(0, 1)
        if self.clamp == "straight_through":
            return image + (image.clamp(0, 1) - image).detach()
        return image
