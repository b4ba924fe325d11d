"""CLIP-family rewards on transformers' `CLIPModel` (docs/ecosystem.md (c)): CLIPScore and the LAION
aesthetic predictor. Frozen, differentiable with respect to the pixels (M7), tensor-only preprocessing.

Loading: a `CLIPModel` instance, a local directory or a hub id (``CLIPModel.from_pretrained(...,
local_files_only=...)``); the aesthetic head from a safetensors file or the original ``.pth`` state dict
(keys ``layers.{0,2,4,6,7}.{weight,bias}``, improved-aesthetic-predictor's layout).

Memory (shared by every reward here and in pickscore/hps/image_reward): ``checkpoint=True`` recomputes each
vision-tower layer in backward (`set_layer_checkpointing`), so the reward backward keeps one layer's
activations alive instead of all of them; towers may be bf16 (``torch_dtype``), scores are fp32.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from flowkern.rewards.base import Reward
from flowkern.rewards.files import check_model_dir, check_tokenizer_dir, is_local, one_line, require_file
from flowkern.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess

__all__ = [
    "AESTHETIC_DIMS",
    "AestheticHead",
    "AestheticReward",
    "CLIPScoreReward",
    "layer_checkpointing_enabled",
    "load_clip",
    "set_layer_checkpointing",
]

AESTHETIC_DIMS = (768, 1024, 128, 64, 16, 1)  # sac+logos+ava1-l14-linearMSE: no activations between layers
AESTHETIC_EXPECTED = "the LAION aesthetic MLP state dict, e.g. sac+logos+ava1-l14-linearMSE.pth (layers.N.weight)"
_TEXT_CACHE_LIMIT = 4096


def _checkpointed_forward(layer: nn.Module, *args, **kwargs):
    forward = type(layer).forward
    if not torch.is_grad_enabled():
        return forward(layer, *args, **kwargs)
    # Non-reentrant: gradients reach inputs even though the (frozen) weights need none; kwargs are allowed.
    return torch.utils.checkpoint.checkpoint(forward, layer, *args, use_reentrant=False, **kwargs)


def set_layer_checkpointing(layers: Iterable[nn.Module], enabled: bool = True) -> None:
    """Activation checkpointing per layer: each layer's forward runs under `torch.utils.checkpoint` when grad
    is enabled (its inputs are saved, its internals recomputed in backward).

    transformers' own ``gradient_checkpointing_enable`` acts only in train mode, and rewards stay in eval
    mode, so the layer's ``forward`` is overridden on the instance (state dict and hooks are unchanged; a
    ``functools.partial`` so `copy.deepcopy` rebinds it to the copy).
    """
    for layer in layers:
        patched = isinstance(layer.__dict__.get("forward"), functools.partial)
        if enabled and not patched:
            layer.forward = functools.partial(_checkpointed_forward, layer)
        elif not enabled and patched:
            del layer.forward


def layer_checkpointing_enabled(layers: Iterable[nn.Module]) -> bool:
    """Whether `set_layer_checkpointing` is on for every layer of ``layers`` (False when empty)."""
    flags = [isinstance(layer.__dict__.get("forward"), functools.partial) for layer in layers]
    return bool(flags) and all(flags)


def load_clip(
    model: str | os.PathLike | nn.Module,
    *,
    local_files_only: bool = False,
    torch_dtype: torch.dtype | None = None,
    **kwargs,
) -> nn.Module:
    """A frozen eval-mode `CLIPModel`: ``model`` itself, or loaded from a local directory (never the network;
    checked first: ``config.json`` of a ``clip`` model and a weights file) or a hub id."""
    if isinstance(model, nn.Module):
        clip = model if torch_dtype is None else model.to(torch_dtype)
    else:
        from transformers import CLIPModel

        if is_local(model):
            what = "a transformers CLIPModel folder (save_pretrained)"
            path, weights = check_model_dir(model, "clip", what)
            try:
                clip = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch_dtype, **kwargs)
            except Exception as err:  # a truncated / foreign weights file: transformers raises many types
                raise ValueError(f"{weights}: cannot load it ({one_line(err)}; expected {what})") from None
        else:
            clip = CLIPModel.from_pretrained(model, local_files_only=local_files_only, dtype=torch_dtype, **kwargs)
    clip.eval().requires_grad_(False)
    return clip


def _load_tokenizer(tokenizer, source, local_files_only: bool, what: str = "a CLIP tokenizer"):
    """``tokenizer`` itself, or loaded from it / ``source`` (a local folder: never the network; or a hub id)."""
    if tokenizer is not None and not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    source = tokenizer if tokenizer is not None else source
    if source is None or isinstance(source, nn.Module):
        raise ValueError("pass tokenizer= (an object, local directory or hub id) when the model is an instance")
    from transformers import AutoTokenizer

    if is_local(source):
        path = check_tokenizer_dir(source, what)
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:  # unreadable / foreign tokenizer files
            raise ValueError(f"{path}: cannot load the tokenizer ({one_line(err)}; expected {what})") from None
    return AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)


class _CLIPReward(Reward):
    """Shared CLIP machinery: differentiable image features, cached text features."""

    crop_offset = "floor"  # CLIPImageProcessor's center crop; "round" for torchvision-preprocessed models (HPS)

    def __init__(self, clip: nn.Module, *, clamp: str = "hard", size: int | None = None, checkpoint: bool = False):
        super().__init__()
        self.clip = clip
        vision = clip.config.vision_config
        self.size = int(size or vision.image_size)
        self.clamp = clamp
        if checkpoint:
            self.set_checkpointing(True)
        self.freeze()

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual_projection.weight.dtype

    def checkpointed_layers(self) -> list[nn.Module]:
        """The layers `set_checkpointing` acts on: the vision tower's (text features are cached, no grad)."""
        return list(self.clip.vision_model.encoder.layers)

    def set_checkpointing(self, enabled: bool = True) -> None:
        """Per-layer activation checkpointing of the vision tower (see `set_layer_checkpointing`); it lives on
        the layers, so rewards sharing one `CLIPModel` share it."""
        set_layer_checkpointing(self.checkpointed_layers(), enabled)

    @property
    def checkpointing(self) -> bool:
        return layer_checkpointing_enabled(self.checkpointed_layers())

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings [B, P] (fp32) from validated [0, 1] images."""
        pixels = clip_preprocess(
            images, self.size, mean=CLIP_MEAN, std=CLIP_STD, clamp=self.clamp, dtype=self.dtype,
            crop_offset=self.crop_offset,
        )  # fmt: skip
        pooled = self.clip.vision_model(pixel_values=pixels).pooler_output
        emb = self.clip.visual_projection(pooled)
        acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
        return F.normalize(emb.to(acc), dim=-1)


class CLIPScoreReward(_CLIPReward):
    """cos(image, text) of CLIP's projected embeddings, times ``scale`` (100 for the CLIPScore convention).

    Each prompt is tokenized and encoded once (cached; the text tower is frozen).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        *,
        scale: float = 1.0,
        clamp: str = "hard",
        size: int | None = None,
        checkpoint: bool = False,
    ):
        super().__init__(clip, clamp=clamp, size=size, checkpoint=checkpoint)
        self.tokenizer = tokenizer
        self.scale = float(scale)
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | nn.Module,
        *,
        tokenizer=None,
        local_files_only: bool = False,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> CLIPScoreReward:
        clip = load_clip(model, local_files_only=local_files_only, torch_dtype=torch_dtype)
        return cls(clip, _load_tokenizer(tokenizer, model, local_files_only), **kwargs)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings [B, P] (fp32), cached per prompt string."""
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            max_len = self.clip.config.text_config.max_position_embeddings
            tokens = self.tokenizer(
                missing, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
            )
            device = self.clip.text_projection.weight.device
            out = self.clip.text_model(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            )
            emb = self.clip.text_projection(out.pooler_output)
            acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
            emb = F.normalize(emb.to(acc), dim=-1)
            if len(self._text_cache) + len(missing) > _TEXT_CACHE_LIMIT:
                self._text_cache.clear()
            self._text_cache.update(zip(missing, emb, strict=True))
        return torch.stack([self._text_cache[p] for p in prompts])

    def _apply(self, fn, recurse=True):  # .to(dtype/device) invalidates the cached text features
        self._text_cache = {}
        return super()._apply(fn, recurse)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = self.image_features(images)
        txt = self.text_features(prompts).to(device=img.device, dtype=img.dtype)
        return self.scale * (img * txt).sum(-1)


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP: Linear layers with no activations, dropout after all but the
    last two (identity in eval), so ``layers.{0,2,4,6,7}`` matches the original checkpoint for 5 layers."""

    def __init__(self, dims: Sequence[int] = AESTHETIC_DIMS, dropout: Sequence[float] = (0.2, 0.2, 0.1)):
        super().__init__()
        dims = [int(d) for d in dims]
        if len(dims) < 2 or dims[-1] != 1 or min(dims) < 1:
            raise ValueError(f"dims must be [in, ..., 1] with positive sizes, got {dims}")
        layers: list[nn.Module] = []
        n = len(dims) - 1
        for i in range(n):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n - 2:
                layers.append(nn.Dropout(dropout[i] if i < len(dropout) else 0.0))
        self.layers = nn.Sequential(*layers)
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> AestheticHead:
        """Build with dims read from the Linear weights of ``state`` (keys ``layers.N.weight``) and load it."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        weights = sorted(
            ((int(k.split(".")[1]), v) for k, v in state.items() if k.startswith("layers.") and k.endswith(".weight")),
            key=lambda kv: kv[0],
        )
        if not weights:
            raise ValueError(f"no 'layers.N.weight' keys (expected {AESTHETIC_EXPECTED})")
        dims = [weights[0][1].shape[1]] + [w.shape[0] for _, w in weights]
        try:
            head = cls(dims)
            head.load_state_dict(state, strict=True)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"not an aesthetic MLP head ({one_line(err)}; expected {AESTHETIC_EXPECTED})") from None
        return head

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AestheticHead:
        """From a ``.safetensors`` file or the original ``.pth`` state dict (loaded with ``weights_only=True``);
        a missing, truncated or foreign file is a one-line error naming it."""
        from flowkern.rewards.convert import load_state_dict_file

        path = require_file(path, AESTHETIC_EXPECTED)
        try:
            return cls.from_state_dict(load_state_dict_file(path, AESTHETIC_EXPECTED))
        except ValueError as err:
            raise ValueError(str(err) if str(err).startswith(path) else f"{path}: {err}") from None


class AestheticReward(_CLIPReward):
    """LAION aesthetic score: CLIP image embedding -> L2 normalise -> `AestheticHead` -> [B] (prompts unused)."""

    needs_prompts = False

    def __init__(
        self,
        clip: nn.Module,
        head: AestheticHead,
        *,
        clamp: str = "hard",
        size: int | None = None,
        checkpoint: bool = False,
    ):
        super().__init__(clip, clamp=clamp, size=size, checkpoint=checkpoint)
        if head.dims[0] != clip.config.projection_dim:
            raise ValueError(
                f"aesthetic head input width {head.dims[0]} != the CLIP model's projection_dim "
                f"{clip.config.projection_dim} (the LAION head fits CLIP ViT-L/14: 768)"
            )
        self.head = head.to(device=clip.visual_projection.weight.device)
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | nn.Module,
        head: str | os.PathLike | AestheticHead,
        *,
        local_files_only: bool = False,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> AestheticReward:
        clip = load_clip(model, local_files_only=local_files_only, torch_dtype=torch_dtype)
        if isinstance(head, AestheticHead):
            return cls(clip, head, **kwargs)
        try:
            return cls(clip, AestheticHead.from_file(head), **kwargs)
        except ValueError as err:
            path = os.fspath(head)
            raise ValueError(str(err) if str(err).startswith(path) else f"{path}: {err}") from None

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        emb = self.image_features(images)  # fp32 (fp64 for an fp64 tower); the head stays in its own dtype
        return self.head(emb.to(self.head.layers[0].weight.dtype)).squeeze(-1)
