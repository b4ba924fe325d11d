"""Human Preference Score v2 / v2.1 (Wu et al., 2023; docs/ecosystem.md (c)).

The released weights (``xswu/HPSv2``: ``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) are open_clip
ViT-H-14 state dicts under ``['state_dict']``; `flowkern.rewards.convert.open_clip_to_transformers` maps them
onto a transformers `CLIPModel` (tested against an own open_clip reference forward on tiny weights).

score = ``cos(image_emb, text_emb)``, as HPSv2's ``score()`` (``image_features @ text_features.T`` of
normalised features; about 0.2-0.35 on real images); ``scale=100`` gives the "x100" numbers some papers
report. v2 and v2.1 scores are not comparable. Preprocessing: open_clip's eval transform (short side to 224,
bicubic, torchvision center crop, CLIP mean/std), tensor-only here. Tokenizer: open_clip's ViT-H-14 BPE,
identical ids to ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s CLIPTokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from flowkern.rewards.clip import CLIPScoreReward, _load_tokenizer, load_clip
from flowkern.rewards.convert import load_state_dict_file, open_clip_to_transformers
from flowkern.rewards.files import find_tokenizer_dir, is_local, require_file

__all__ = ["HPS_FILES", "HPS_REPO", "HPS_TOKENIZER", "HPSReward", "HPSv21Reward", "clip_from_open_clip"]

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_EXPECTED = "an open_clip CLIP checkpoint such as HPS_v2_compressed.pt (ViT-H-14 weights under 'state_dict')"
TOKENIZER_EXPECTED = f"the CLIP tokenizer of {HPS_TOKENIZER} (vocab.json, merges.txt, tokenizer_config.json)"


def clip_from_open_clip(
    state: Mapping[str, torch.Tensor] | str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    **convert_kwargs,
) -> nn.Module:
    """A frozen transformers `CLIPModel` from an open_clip state dict or checkpoint file (.pt/.safetensors)."""
    from transformers import CLIPModel

    path = None
    if isinstance(state, str | os.PathLike):
        path = os.fspath(state)
        state = load_state_dict_file(path, HPS_EXPECTED)
    try:
        config, converted = open_clip_to_transformers(state, **convert_kwargs)
    except (TypeError, ValueError) as err:
        if path is None:
            raise
        raise ValueError(f"{path}: {err} (expected {HPS_EXPECTED})") from None
    # fp32 weights (fp16 / bf16 checkpoints upcast; cast with torch_dtype); fp64 kept for gradcheck
    fp64 = converted["vision_model.embeddings.patch_embedding.weight"].dtype == torch.float64
    model = CLIPModel(config).to(torch.float64 if fp64 else torch.float32)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"converted open_clip weights do not fit CLIPModel: missing {missing}, extra {unexpected}")
    return load_clip(model, torch_dtype=torch_dtype)


class HPSReward(CLIPScoreReward):
    """HPSv2: ``scale * cos(image, text)`` of a converted open_clip ViT-H-14 (``scale=1`` by default)."""

    version = "v2.0"
    crop_offset = "round"  # torchvision CenterCrop (open_clip's eval transform)

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike | nn.Module = HPS_REPO,
        *,
        tokenizer=None,
        local_files_only: bool = False,
        torch_dtype: torch.dtype | None = None,
        vision_heads: int | None = None,
        text_heads: int | None = None,
        **kwargs,
    ) -> HPSReward:
        """``source``: a converted `CLIPModel` directory (from `save_pretrained`) or instance; an open_clip
        checkpoint file (``HPS_v2*_compressed.pt``); or the hub repo ``xswu/HPSv2``, from which this class's
        version file is fetched (``local_files_only`` honoured). Local sources never touch the network.
        ``tokenizer``: object or folder; default: the directory for a directory, the checkpoint's folder (or its
        ``tokenizer/`` subfolder) for a file, ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` for the hub repo.
        Head counts: see `open_clip_to_transformers`.
        """
        if isinstance(source, nn.Module):
            clip = load_clip(source, torch_dtype=torch_dtype)
            return cls(clip, _load_tokenizer(tokenizer, None, local_files_only), **kwargs)
        if not isinstance(source, str | os.PathLike):
            raise TypeError(f"source must be a path, hub id or CLIPModel, got {type(source).__name__}")
        if is_local(source) and os.path.isdir(source):
            clip = load_clip(source, torch_dtype=torch_dtype)
            return cls(clip, _load_tokenizer(tokenizer, source, local_files_only), **kwargs)
        if is_local(source):
            path = require_file(source, HPS_EXPECTED)
            if tokenizer is None:
                tokenizer = find_tokenizer_dir(path)
                if tokenizer is None:
                    folder = os.path.dirname(os.path.abspath(path))
                    raise FileNotFoundError(
                        f"{path}: no tokenizer next to it (expected {TOKENIZER_EXPECTED} in {folder} or "
                        f"{os.path.join(folder, 'tokenizer')}, or pass tokenizer=)"
                    )
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source, HPS_FILES[cls.version], local_files_only=local_files_only)
            tokenizer = HPS_TOKENIZER if tokenizer is None else tokenizer
        clip = clip_from_open_clip(path, torch_dtype=torch_dtype, vision_heads=vision_heads, text_heads=text_heads)
        return cls(clip, _load_tokenizer(tokenizer, None, local_files_only), **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The converted `CLIPModel` and the tokenizer into ``directory`` (``from_pretrained(directory)``)."""
        self.clip.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


class HPSv21Reward(HPSReward):
    """HPSv2.1 (same architecture, retrained weights ``HPS_v2.1_compressed.pt``)."""

    version = "v2.1"
