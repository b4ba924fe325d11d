"""ImageReward (Xu et al., 2023; docs/ecosystem.md (c)) on transformers' Blip modules, differentiable.

Architecture of the released ``THUDM/ImageReward`` (``ImageReward.pt`` + ``med_config.json``):
BLIP ViT-L/16 at 224 px (all tokens, final LayerNorm) -> BERT-base text encoder whose every layer
cross-attends to the image tokens -> the [CLS] state (768) -> MLP 768->1024->128->64->16->1 (no
activations; the improved-aesthetic-predictor layout, `AestheticHead`) -> ``(r - 0.16717362830052426) /
1.0333394966054072``. Text: bert-base-uncased + BLIP's ``[DEC]``/``[ENC]`` tokens, ``padding="max_length"``,
``max_length=35``, input ids start with [CLS] (the score path does not swap in [ENC]). Pixels: short side to
224 (bicubic), torchvision center crop, CLIP mean/std. This is the graph of the original's ``score_gard``.

`flowkern.rewards.convert.imagereward_to_transformers` maps the original keys; tests/test_rewards_models.py
checks the converted model against an own reference forward of the original layout on tiny weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from flowkern.rewards.base import Reward
from flowkern.rewards.clip import AestheticHead, layer_checkpointing_enabled, set_layer_checkpointing
from flowkern.rewards.convert import imagereward_to_transformers, load_state_dict_file
from flowkern.rewards.files import find_tokenizer_dir, is_local, one_line, require_file
from flowkern.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess

__all__ = [
    "IMAGEREWARD_MAX_LENGTH",
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_REPO",
    "IMAGEREWARD_STD",
    "ImageRewardModel",
    "ImageRewardReward",
    "load_blip_tokenizer",
]

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35
IMAGEREWARD_TOKENIZER = "bert-base-uncased"
IMAGEREWARD_EXPECTED = "ImageReward.pt of THUDM/ImageReward (BLIP ViT + BERT with cross-attention + MLP state dict)"
TOKENIZER_EXPECTED = "the bert-base-uncased tokenizer (vocab.txt, tokenizer_config.json)"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_FORMAT = "flowkern-imagereward"
_TOKEN_CACHE_LIMIT = 4096


def load_blip_tokenizer(source=IMAGEREWARD_TOKENIZER, *, local_files_only: bool = False):
    """A BERT tokenizer with BLIP's added tokens (``[DEC]`` as bos, ``[ENC]``), as BLIP's ``init_tokenizer``;
    an object is returned as is, tokens already present are not added twice. A local folder is read with no
    network access (one-line error when it holds no tokenizer)."""
    if source is not None and not isinstance(source, str | os.PathLike):
        return source
    from flowkern.rewards.clip import _load_tokenizer

    tok = _load_tokenizer(source, None, local_files_only, TOKENIZER_EXPECTED)
    vocab = tok.get_vocab()
    if "[DEC]" not in vocab:
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in vocab:
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardModel(nn.Module):
    """``vision_model`` (`BlipVisionModel`), ``text_encoder`` (`BlipTextModel` with cross-attention, no pooler),
    ``head`` (`AestheticHead` layout); ``forward(pixel_values, input_ids, attention_mask) -> [B]`` normalised.

    The head runs in its own dtype (fp32 unless the whole model was cast), the towers in theirs (e.g. bf16).
    """

    def __init__(
        self,
        vision_config: Mapping,
        text_config: Mapping,
        head_dims: Sequence[int] = (768, 1024, 128, 64, 16, 1),
        *,
        score_mean: float = IMAGEREWARD_MEAN,
        score_std: float = IMAGEREWARD_STD,
        max_length: int = IMAGEREWARD_MAX_LENGTH,
    ):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        vision_config, text_config = dict(vision_config), dict(text_config)
        text_config.setdefault("is_decoder", True)  # builds the cross-attention layers; forward stays bidirectional
        text_config.setdefault("encoder_hidden_size", vision_config.get("hidden_size", 768))
        if not text_config["is_decoder"]:
            raise ValueError("text_config['is_decoder'] must be True (transformers gates cross-attention on it)")
        if text_config["encoder_hidden_size"] != vision_config.get("hidden_size", 768):
            raise ValueError("text_config['encoder_hidden_size'] must equal vision_config['hidden_size']")
        if float(score_std) <= 0:
            raise ValueError(f"score_std must be positive, got {score_std}")
        self.vision_model = BlipVisionModel(BlipVisionConfig(**vision_config))
        self.text_encoder = BlipTextModel(BlipTextConfig(**text_config), add_pooling_layer=False)
        self.head = AestheticHead(head_dims)
        hidden = self.text_encoder.config.hidden_size
        if self.head.dims[0] != hidden:
            raise ValueError(f"head input {self.head.dims[0]} != text hidden size {hidden}")
        self.vision_kwargs, self.text_kwargs = vision_config, text_config
        self.score_mean, self.score_std, self.max_length = float(score_mean), float(score_std), int(max_length)

    @property
    def image_size(self) -> int:
        return int(self.vision_model.config.image_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.embeddings.patch_embedding.weight.dtype

    def to_config(self) -> dict:
        return {
            "format": _FORMAT,
            "vision_config": self.vision_kwargs,
            "text_config": self.text_kwargs,
            "head_dims": list(self.head.dims),
            "score_mean": self.score_mean,
            "score_std": self.score_std,
            "max_length": self.max_length,
        }

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # post-LayerNorm, all tokens
        # Every image token is valid (the original passes an all-ones encoder mask): no cross-attention mask.
        text = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds
        ).last_hidden_state
        head_dtype = self.head.layers[0].weight.dtype
        reward = self.head(text[:, 0].to(head_dtype)).squeeze(-1)
        return (reward - self.score_mean) / self.score_std

    # ------------------------------------------------------------ loading
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """``config.json`` + ``model.safetensors`` (keys ``vision_model.*``, ``text_encoder.*``, ``head.*``)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_config(), f, indent=2)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, torch_dtype: torch.dtype | None = None):
        """From a `save_pretrained` directory; ``torch_dtype`` casts the two towers (the head stays fp32)."""
        from safetensors.torch import load_file

        path = os.path.join(os.fspath(directory), CONFIG_NAME)
        expected = "an ImageRewardReward.save_pretrained folder: config.json + model.safetensors"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not found (expected {expected})")
        with open(path) as f:
            config = json.load(f)
        if config.pop("format", None) != _FORMAT:
            raise ValueError(f"{path}: not an ImageRewardModel config (format {_FORMAT!r} expected; {expected})")
        model = cls(**config)
        weights = require_file(os.path.join(os.fspath(directory), WEIGHTS_NAME), expected)
        try:
            model.load_state_dict(load_file(weights), strict=True)
        except Exception as err:  # truncated file (SafetensorError) or other weights (RuntimeError)
            raise ValueError(f"{weights}: cannot load ({one_line(err)}; expected {expected})") from None
        return model.cast_towers(torch_dtype)

    @classmethod
    def from_original(
        cls,
        checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        med_config: str | os.PathLike | Mapping | None = None,
        vision_heads: int | None = None,
        torch_dtype: torch.dtype | None = None,
    ):
        """From the released ``ImageReward.pt`` (path or state dict) and optionally ``med_config.json``;
        ``vision_heads`` defaults to ViT-L's 16 at width 1024 (see `imagereward_to_transformers`)."""
        path = os.fspath(checkpoint) if isinstance(checkpoint, str | os.PathLike) else None
        state = checkpoint if path is None else load_state_dict_file(path, IMAGEREWARD_EXPECTED)
        if isinstance(med_config, str | os.PathLike):
            med_config = require_file(med_config, "med_config.json of THUDM/ImageReward")
        try:
            config, converted = imagereward_to_transformers(state, med_config=med_config, vision_heads=vision_heads)
        except (TypeError, ValueError) as err:
            if path is None:
                raise
            raise ValueError(f"{path}: {err} (expected {IMAGEREWARD_EXPECTED})") from None
        model = cls(**config)
        if converted["head.layers.0.weight"].dtype == torch.float64:
            model.double()  # fp64 kept for gradcheck; other checkpoints load into fp32 (cast with torch_dtype)
        model.load_state_dict(converted, strict=True)
        return model.cast_towers(torch_dtype)

    def cast_towers(self, dtype: torch.dtype | None):
        if dtype is not None:
            self.vision_model.to(dtype)
            self.text_encoder.to(dtype)
        return self


class ImageRewardReward(Reward):
    """ImageReward score of [0, 1] images and prompts, differentiable with respect to the pixels (M7).

    ``checkpoint=True`` recomputes every vision and text layer in backward (the text layers see the image
    through cross-attention, so both hold pixel-dependent activations).
    """

    def __init__(
        self,
        model: ImageRewardModel,
        tokenizer,
        *,
        clamp: str = "hard",
        size: int | None = None,
        checkpoint: bool = False,
    ):
        super().__init__()
        if not isinstance(model, ImageRewardModel):
            raise TypeError(f"model must be an ImageRewardModel, got {type(model).__name__}")
        vocab = model.text_encoder.config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the text encoder only {vocab}")
        self.model = model
        self.tokenizer = tokenizer
        self.size = int(size or model.image_size)
        self.clamp = clamp
        self._token_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if checkpoint:
            self.set_checkpointing(True)
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike | ImageRewardModel = IMAGEREWARD_REPO,
        *,
        tokenizer=None,
        med_config: str | os.PathLike | Mapping | None = None,
        vision_heads: int | None = None,
        local_files_only: bool = False,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> ImageRewardReward:
        """``source``: an `ImageRewardModel`, a `save_pretrained` directory, the original ``ImageReward.pt``,
        or the hub repo ``THUDM/ImageReward`` (``ImageReward.pt`` + ``med_config.json`` fetched,
        ``local_files_only`` honoured). Local sources never touch the network: ``med_config`` defaults to
        ``med_config.json`` beside the file (bert-base values if absent), ``tokenizer`` to the file's folder or
        its ``tokenizer/`` subfolder (one-line error if neither has one); a directory holds its own tokenizer.
        Hub: ``tokenizer`` defaults to ``bert-base-uncased``. BLIP's tokens are added (`load_blip_tokenizer`)."""
        if isinstance(source, ImageRewardModel):
            model = source.cast_towers(torch_dtype)
        elif not isinstance(source, str | os.PathLike):
            raise TypeError(f"source must be a path, hub id or ImageRewardModel, got {type(source).__name__}")
        elif is_local(source) and os.path.isdir(source):
            model = ImageRewardModel.from_pretrained(source, torch_dtype=torch_dtype)
            tokenizer = source if tokenizer is None else tokenizer
        elif is_local(source):
            path = require_file(source, IMAGEREWARD_EXPECTED)
            folder = os.path.dirname(os.path.abspath(path))
            if med_config is None and os.path.isfile(os.path.join(folder, "med_config.json")):
                med_config = os.path.join(folder, "med_config.json")
            if tokenizer is None:
                tokenizer = find_tokenizer_dir(path)
                if tokenizer is None:
                    raise FileNotFoundError(
                        f"{path}: no tokenizer next to it (expected {TOKENIZER_EXPECTED} in {folder} or "
                        f"{os.path.join(folder, 'tokenizer')}, or pass tokenizer=)"
                    )
            model = ImageRewardModel.from_original(
                path, med_config=med_config, vision_heads=vision_heads, torch_dtype=torch_dtype
            )
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source, "ImageReward.pt", local_files_only=local_files_only)
            if med_config is None:
                med_config = hf_hub_download(source, "med_config.json", local_files_only=local_files_only)
            model = ImageRewardModel.from_original(
                path, med_config=med_config, vision_heads=vision_heads, torch_dtype=torch_dtype
            )
        tok = load_blip_tokenizer(IMAGEREWARD_TOKENIZER if tokenizer is None else tokenizer,
                                  local_files_only=local_files_only)  # fmt: skip
        return cls(model, tok, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Model and tokenizer into ``directory`` (``from_pretrained(directory)``)."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def checkpointed_layers(self) -> list[nn.Module]:
        return [*self.model.vision_model.encoder.layers, *self.model.text_encoder.encoder.layer]

    def set_checkpointing(self, enabled: bool = True) -> None:
        set_layer_checkpointing(self.checkpointed_layers(), enabled)

    @property
    def checkpointing(self) -> bool:
        return layer_checkpointing_enabled(self.checkpointed_layers())

    def text_inputs(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [B, max_length], tokenized once per prompt string."""
        missing = sorted({p for p in prompts if p not in self._token_cache})
        if missing:
            tokens = self.tokenizer(
                missing, padding="max_length", truncation=True, max_length=self.model.max_length, return_tensors="pt"
            )
            if len(self._token_cache) + len(missing) > _TOKEN_CACHE_LIMIT:
                self._token_cache.clear()
            self._token_cache.update(zip(missing, zip(tokens["input_ids"], tokens["attention_mask"])))
        ids = torch.stack([self._token_cache[p][0] for p in prompts])
        mask = torch.stack([self._token_cache[p][1] for p in prompts])
        return ids, mask

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(
            images, self.size, mean=CLIP_MEAN, std=CLIP_STD, clamp=self.clamp, dtype=self.dtype, crop_offset="round"
        )
        ids, mask = self.text_inputs(prompts)
        device = pixels.device
        return self.model(pixels, ids.to(device), mask.to(device))
