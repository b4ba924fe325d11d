"""Tiny velocity models for CPU tests and benchmarks (docs/ecosystem.md section (a)).

Everything here is built from a config with random weights: no downloads. Velocities are in paper
time (M1): t in [0, 1], t=0 noise, t=1 data, v = dx/dt. The SD3 wrapper converts like the adapter
does (M3): timestep = 1000 * (1 - t), v = -transformer output.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

SD3_TINY = dict(
    sample_size=32,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=32,
    out_channels=4,
    pos_embed_max_size=32,
)

# SD3-medium's transformer config (random weights; benchmarks only, it has ~2B parameters).
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_sd3_transformer(
    seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", config: dict | None = None
) -> nn.Module:
    """A `SD3Transformer2DModel` from config in eval mode (train mode would enable dropout), frozen."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**(config or SD3_TINY)).eval()
    model.requires_grad_(False)
    # .to(dtype) logs a warning about modules to keep in fp32 (none in SD3): silence it
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return model.to(device=device, dtype=dtype)
    finally:
        logger.setLevel(level)


def add_lora(transformer: nn.Module, rank: int = 4, seed: int = 0) -> list[nn.Parameter]:
    """Attach a gaussian-initialised peft LoRA (docs/ecosystem.md (b)); returns its trainable parameters."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        )
    params = [p for p in transformer.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # lora_B starts at zero: randomise it so the adapter changes the output
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return params


def sd3_conditioning(
    batch: int,
    config: dict | None = None,
    seq_len: int = 8,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (prompt_embeds [B, L, joint_attention_dim], pooled [B, pooled_projection_dim])."""
    config = config or SD3_TINY
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, seq_len, config["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, config["pooled_projection_dim"], generator=g)
    return text.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)


def sd3_latent_shape(batch: int, config: dict | None = None, resolution: int | None = None) -> tuple[int, ...]:
    """Latent shape; `resolution` in pixels with SD3's VAE factor 8 (default: the config's sample_size)."""
    config = config or SD3_TINY
    side = resolution // 8 if resolution is not None else config["sample_size"]
    return (batch, config["in_channels"], side, side)


def _double(t: torch.Tensor) -> torch.Tensor:
    """The time of a [2B] CFG batch: a [B] t is repeated, a 0-dim t shared."""
    t = torch.as_tensor(t)
    return torch.cat([t, t]) if t.dim() == 1 else t


class SD3Velocity:
    """Paper-time velocity of an SD3 transformer with bound conditioning (what the adapter does, M3).

    ``guidance_scale=None``: ``velocity(x, t)`` with ``x`` [B, ...] returns v [B, ...] (conditional).
    ``guidance_scale=w``: ``velocity(x, t)`` returns the CFG velocity (1-w) v_u + w v_c (M5) from one
    [2B] batch (uncond first); ``branches(x2, t)`` takes that [2B] batch (t 0-dim or [2B]) and returns
    [v_u; v_c] (the form `flowkern.lean_adjoint` uses for CFG); ``pair(x, t)`` returns (v_u, v_c)
    (the sampler's form).
    """

    def __init__(
        self,
        transformer: nn.Module,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        guidance_scale: float | None = None,
        negative_embeds: torch.Tensor | None = None,
        negative_pooled: torch.Tensor | None = None,
    ):
        self.transformer = transformer
        self.guidance_scale = guidance_scale
        self.prompt_embeds, self.pooled = prompt_embeds, pooled
        if guidance_scale is not None:
            negative_embeds = torch.zeros_like(prompt_embeds) if negative_embeds is None else negative_embeds
            negative_pooled = torch.zeros_like(pooled) if negative_pooled is None else negative_pooled
            self.cfg_embeds = torch.cat([negative_embeds, prompt_embeds])
            self.cfg_pooled = torch.cat([negative_pooled, pooled])

    def _call(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        timestep = (1000.0 * (1.0 - t.to(torch.float32))).expand(x.shape[0])  # fp32: diffusers embeds it in fp32
        out = self.transformer(
            hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=timestep
        ).sample
        return -out

    def branches(self, x2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.guidance_scale is None:
            raise ValueError("branches() needs guidance_scale")
        return self._call(x2, t, self.cfg_embeds, self.cfg_pooled)

    def pair(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self.branches(torch.cat([x, x]), _double(t)).chunk(2))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.guidance_scale is None:
            return self._call(x, t, self.prompt_embeds, self.pooled)
        v_uncond, v_cond = self.pair(x, t)
        w = self.guidance_scale
        return v_uncond + w * (v_cond - v_uncond)


def timestep_features(t: torch.Tensor, batch: int, dtype: torch.dtype, n: int = 8) -> torch.Tensor:
    """[B, 2n] sinusoidal features of t (0-dim or [B])."""
    t = torch.as_tensor(t).to(dtype).reshape(-1).expand(batch)
    freqs = torch.exp(torch.arange(n, dtype=dtype, device=t.device) * (math.log(100.0) / max(n - 1, 1)))
    angles = t[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class MLPVelocity(nn.Module):
    """v(x, t): an MLP on the flattened sample and sinusoidal time features; x [B, ...] -> [B, ...].

    With ``num_classes`` it is class-conditional: ``forward(x, t, cond)``, ``cond`` labels [B], label
    ``num_classes`` (or ``cond=None``) the null class used for CFG (see `MLPCFGVelocity`).
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, num_classes: int | None = None, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(num_classes + 1, 16) if num_classes is not None else None
            width = dim + 16 + (16 if num_classes is not None else 0)
            layers: list[nn.Module] = []
            for _ in range(depth - 1):
                layers += [nn.Linear(width, hidden), nn.SiLU()]
                width = hidden
            layers.append(nn.Linear(width, dim))
            self.net = nn.Sequential(*layers)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]
        feats = [x.reshape(batch, -1), timestep_features(t, batch, x.dtype).to(x.device)]
        if self.embed is not None:
            labels = torch.full((batch,), self.num_classes, device=x.device) if cond is None else cond
            feats.append(self.embed(labels).to(x.dtype))
        return self.net(torch.cat(feats, dim=1)).reshape(x.shape)


class MLPCFGVelocity:
    """CFG over a class-conditional `MLPVelocity` (null class = num_classes), same interface as `SD3Velocity`."""

    def __init__(self, model: MLPVelocity, labels: torch.Tensor, guidance_scale: float | None):
        self.model, self.labels, self.guidance_scale = model, labels, guidance_scale
        null = torch.full_like(labels, model.num_classes)
        self.cfg_labels = torch.cat([null, labels])

    def branches(self, x2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x2, t, self.cfg_labels)

    def pair(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self.branches(torch.cat([x, x]), _double(t)).chunk(2))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.guidance_scale is None:
            return self.model(x, t, self.labels)
        v_uncond, v_cond = self.pair(x, t)
        w = self.guidance_scale
        return v_uncond + w * (v_cond - v_uncond)
