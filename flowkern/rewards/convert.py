"""Checkpoint converters for the released reward weights (docs/ecosystem.md (c)): original key layouts ->
transformers modules. Pure functions on state dicts (no model code runs here).

* **open_clip -> `CLIPModel`** (HPSv2 / HPSv2.1: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` are
  open_clip ViT-H-14 state dicts under ``['state_dict']``). open_clip fuses q/k/v into
  ``attn.in_proj_weight`` [3W, W] (rows q, k, v) and stores the projections as ``x @ proj`` matrices [W, P];
  transformers keeps separate ``q/k/v_proj`` Linears and ``Linear.weight`` = ``proj.T``.
* **ImageReward -> Blip** (``ImageReward.pt``): ``blip.visual_encoder.*`` is BLIP's timm-style ViT (fused
  ``attn.qkv``, LayerNorm eps 1e-6, final ``norm`` on every token), mapped onto `BlipVisionModel`;
  ``blip.text_encoder.*`` is BLIP's med.py BERT with cross-attention, whose names already match
  `BlipTextModel` (``add_pooling_layer=False``); ``mlp.layers.*`` is the 768->1024->128->64->16->1 head;
  ``blip.vision_proj`` / ``blip.text_proj`` (contrastive heads) are unused by the score and dropped.

Shapes give every size except the number of attention heads, which the caller passes (defaults: the
released models' values when the widths match, else open_clip's / BERT's head width 64).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from flowkern.rewards.files import one_line, require_file

__all__ = [
    "IMAGEREWARD_MED_CONFIG",
    "OPEN_CLIP_VIT_H_14",
    "imagereward_to_transformers",
    "load_state_dict_file",
    "open_clip_to_transformers",
    "unwrap_state_dict",
]

# open_clip's ViT-H-14 config (model_configs/ViT-H-14.json): vision width 1280, head_width 80 -> 16 heads;
# text width 1024, 16 heads; nn.GELU (not QuickGELU); LayerNorm eps 1e-5; eot token = last vocab id.
OPEN_CLIP_VIT_H_14 = {"vision_width": 1280, "vision_heads": 16, "text_width": 1024, "text_heads": 16}
# THUDM/ImageReward med_config.json (bert-base + cross-attention to the 1024-wide BLIP ViT-L).
IMAGEREWARD_MED_CONFIG = {
    "hidden_size": 768,
    "num_attention_heads": 12,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "vocab_size": 30524,
}
BLIP_VIT_LARGE_HEADS = 16  # BLIP create_vit('large'): width 1024, 16 heads


def unwrap_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: unwraps ``{'state_dict': ...}`` / ``{'model': ...}`` and strips a DDP
    ``module.`` prefix."""
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint must be a mapping of tensors, got {type(state).__name__}")
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k.removeprefix("module.")] = v
    if not out:
        raise ValueError("checkpoint holds no tensors")
    return out


def load_state_dict_file(path: str | os.PathLike, what: str = "a checkpoint") -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle (``weights_only=True``, memory-mapped), unwrapped.
    A missing, truncated or unreadable file is a one-line error naming it and ``what`` was expected."""
    path = require_file(path, what)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) pickles
    except Exception as err:  # truncated zip / bad header / not a checkpoint: torch and safetensors raise many types
        raise ValueError(
            f"{path}: cannot read it as a torch or safetensors checkpoint, truncated or not one ({one_line(err)}); "
            f"expected {what}"
        ) from None
    try:
        return unwrap_state_dict(state)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err} (expected {what})") from None


def _layer_count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    ids = {int(m.group(1)) for k in state for m in [rx.match(k)] if m}
    if not ids:
        return 0
    if ids != set(range(max(ids) + 1)):
        raise ValueError(f"layer indices of {pattern!r} are not contiguous: {sorted(ids)}")
    return max(ids) + 1


def _require(state: Mapping[str, torch.Tensor], keys: list[str], what: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"not an {what} state dict: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _heads(width: int, given: int | None, released_width: int, released_heads: int, what: str) -> int:
    heads = given if given is not None else (released_heads if width == released_width else max(1, width // 64))
    if heads < 1 or width % heads:
        raise ValueError(f"{what}: width {width} is not divisible by {heads} heads")
    return int(heads)


# ---------------------------------------------------------------- open_clip -> CLIPModel
_OC_BLOCK = {  # open_clip resblock suffix -> transformers CLIPEncoderLayer suffix
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OC_IGNORED = ("attn_mask",)  # the text causal-mask buffer (persistent in old open_clip); transformers builds its own


def _convert_oc_blocks(state, src: str, dst: str, n: int, out: dict, used: set) -> None:
    for i in range(n):
        s, d = f"{src}.{i}.", f"{dst}.{i}."
        for a, b in _OC_BLOCK.items():
            out[d + b] = state[s + a]
            used.add(s + a)
        w, b = state[s + "attn.in_proj_weight"], state[s + "attn.in_proj_bias"]
        for name, wi, bi in zip(("q", "k", "v"), w.chunk(3, dim=0), b.chunk(3, dim=0)):  # rows: q, k, v
            out[d + f"self_attn.{name}_proj.weight"] = wi.clone()
            out[d + f"self_attn.{name}_proj.bias"] = bi.clone()
        used.update((s + "attn.in_proj_weight", s + "attn.in_proj_bias"))


def open_clip_to_transformers(
    state: Mapping[str, Any],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "gelu",
    eos_token_id: int | None = None,
):
    """open_clip `CLIP` state dict -> (`CLIPConfig`, `CLIPModel` state dict).

    ``hidden_act``: ``"gelu"`` for ViT-H-14 (``"quick_gelu"`` for OpenAI-trained towers). ``eos_token_id``:
    the text pooling token; open_clip pools at ``argmax(ids)``, the eot token being the last vocab id, which is
    the default here (transformers then pools at its first occurrence: the same position). Unknown keys raise.
    """
    from transformers import CLIPConfig

    state = unwrap_state_dict(state)
    _require(
        state,
        ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
         "token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight"],
        "open_clip CLIP",
    )  # fmt: skip
    conv = state["visual.conv1.weight"]
    v_width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    if grid * grid + 1 != state["visual.positional_embedding"].shape[0]:
        raise ValueError("visual.positional_embedding must have 1 + grid^2 rows (square image)")
    v_layers = _layer_count(state, r"visual\.transformer\.resblocks\.(\d+)\.")
    t_layers = _layer_count(state, r"transformer\.resblocks\.(\d+)\.")
    vocab, t_width = state["token_embedding.weight"].shape
    projection = state["visual.proj"].shape[1]
    if state["text_projection"].shape[1] != projection:
        raise ValueError(f"text_projection {tuple(state['text_projection'].shape)} and visual.proj differ in width")
    h = OPEN_CLIP_VIT_H_14
    eos = vocab - 1 if eos_token_id is None else int(eos_token_id)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=t_width, num_hidden_layers=t_layers,
            intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_attention_heads=_heads(t_width, text_heads, h["text_width"], h["text_heads"], "text tower"),
            max_position_embeddings=state["positional_embedding"].shape[0], hidden_act=hidden_act,
            layer_norm_eps=1e-5, bos_token_id=max(vocab - 2, 0), eos_token_id=eos, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=v_width, num_hidden_layers=v_layers, patch_size=patch, image_size=patch * grid,
            intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_attention_heads=_heads(v_width, vision_heads, h["vision_width"], h["vision_heads"], "vision tower"),
            hidden_act=hidden_act, layer_norm_eps=1e-5,
        ),
        projection_dim=projection,
    )  # fmt: skip

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str, fn=lambda t: t) -> None:
        out[dst] = fn(state[src]).contiguous()
        used.add(src)

    take("visual.class_embedding", "vision_model.embeddings.class_embedding")
    take("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")
    take("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight")
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        take(f"visual.{a}.weight", f"vision_model.{b}.weight")
        take(f"visual.{a}.bias", f"vision_model.{b}.bias")
    take("visual.proj", "visual_projection.weight", lambda t: t.t())  # x @ proj == Linear(weight=proj.T)
    _convert_oc_blocks(state, "visual.transformer.resblocks", "vision_model.encoder.layers", v_layers, out, used)
    take("token_embedding.weight", "text_model.embeddings.token_embedding.weight")
    take("positional_embedding", "text_model.embeddings.position_embedding.weight")
    take("ln_final.weight", "text_model.final_layer_norm.weight")
    take("ln_final.bias", "text_model.final_layer_norm.bias")
    take("text_projection", "text_projection.weight", lambda t: t.t())
    _convert_oc_blocks(state, "transformer.resblocks", "text_model.encoder.layers", t_layers, out, used)
    if "logit_scale" in state:
        take("logit_scale", "logit_scale", lambda t: t.reshape(()))
    unknown = sorted(k for k in state if k not in used and k not in _OC_IGNORED)
    if unknown:
        raise ValueError(
            f"open_clip state dict has keys this converter does not map (another architecture?): {unknown[:8]}"
        )
    return config, out


# ---------------------------------------------------------------- ImageReward -> Blip
_VIT_BLOCK = {  # BLIP timm-style block suffix -> BlipEncoderLayer suffix
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_IR_DROPPED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def _read_json(config: str | os.PathLike | Mapping | None) -> dict:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    with open(config) as f:
        return json.load(f)


def imagereward_to_transformers(
    state: Mapping[str, Any],
    *,
    med_config: str | os.PathLike | Mapping | None = None,
    vision_heads: int | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """ImageReward checkpoint -> (config dict, state dict of `ImageRewardModel`).

    The config dict holds ``vision_config`` (`BlipVisionConfig` kwargs), ``text_config`` (`BlipTextConfig`
    kwargs) and ``head_dims``. ``med_config`` (the released ``med_config.json``, a path or dict) supplies the
    text tower's head count and LayerNorm eps; without it bert-base values are used (12 heads at width 768).
    """
    state = unwrap_state_dict(state)
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    _require(
        state,
        [v + "patch_embed.proj.weight", v + "cls_token", v + "pos_embed", v + "norm.weight",
         t + "embeddings.word_embeddings.weight", t + "embeddings.position_embeddings.weight",
         "mlp.layers.0.weight"],
        "ImageReward",
    )  # fmt: skip
    med = _read_json(med_config)
    conv = state[v + "patch_embed.proj.weight"]
    v_width, patch = conv.shape[0], conv.shape[-1]
    n_pos = state[v + "pos_embed"].shape[1]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise ValueError("blip.visual_encoder.pos_embed must have 1 + grid^2 positions")
    v_layers = _layer_count(state, r"blip\.visual_encoder\.blocks\.(\d+)\.")
    t_layers = _layer_count(state, r"blip\.text_encoder\.encoder\.layer\.(\d+)\.")
    vocab, t_width = state[t + "embeddings.word_embeddings.weight"].shape
    if t_layers and t + "encoder.layer.0.crossattention.self.key.weight" not in state:
        raise ValueError("ImageReward text encoder has no cross-attention (crossattention.* keys missing)")
    enc_width = state[t + "encoder.layer.0.crossattention.self.key.weight"].shape[1] if t_layers else v_width
    if enc_width != v_width:
        raise ValueError(f"cross-attention key width {enc_width} != vision width {v_width}")
    t_heads = int(med.get("num_attention_heads", 12 if t_width == 768 else max(1, t_width // 64)))
    if t_width % t_heads:
        raise ValueError(f"text width {t_width} is not divisible by {t_heads} heads")
    vision_config = dict(
        hidden_size=v_width, intermediate_size=state[v + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=v_layers, patch_size=patch, image_size=patch * grid,
        num_attention_heads=_heads(v_width, vision_heads, 1024, BLIP_VIT_LARGE_HEADS, "vision tower"),
        hidden_act="gelu", layer_norm_eps=1e-6,  # timm ViT: nn.GELU, LayerNorm(eps=1e-6)
    )  # fmt: skip
    text_config = dict(
        vocab_size=vocab, hidden_size=t_width, encoder_hidden_size=v_width,
        intermediate_size=state[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=t_layers, num_attention_heads=t_heads,
        max_position_embeddings=state[t + "embeddings.position_embeddings.weight"].shape[0],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # eval-only reward
        pad_token_id=int(med.get("pad_token_id", 0)), is_decoder=True,  # is_decoder builds the cross-attention
        # generation-only ids (BLIP's [DEC] = 30522, [SEP] = 102): kept inside the vocab for tiny test models
        bos_token_id=med.get("bos_token_id", 30522 if vocab > 30522 else None),
        sep_token_id=med.get("sep_token_id", 102 if vocab > 102 else None),
    )  # fmt: skip

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str) -> None:
        out[dst] = state[src].contiguous()
        used.add(src)

    take(v + "cls_token", "vision_model.embeddings.class_embedding")
    take(v + "pos_embed", "vision_model.embeddings.position_embedding")
    take(v + "patch_embed.proj.weight", "vision_model.embeddings.patch_embedding.weight")
    take(v + "patch_embed.proj.bias", "vision_model.embeddings.patch_embedding.bias")
    take(v + "norm.weight", "vision_model.post_layernorm.weight")
    take(v + "norm.bias", "vision_model.post_layernorm.bias")
    for i in range(v_layers):
        for a, b in _VIT_BLOCK.items():
            for p in ("weight", "bias"):
                take(f"{v}blocks.{i}.{a}.{p}", f"vision_model.encoder.layers.{i}.{b}.{p}")
    for k in state:
        if k.startswith(t) and not k.startswith(_IR_DROPPED):
            take(k, "text_encoder." + k.removeprefix(t))  # med.py names == BlipTextModel names
    head = sorted((int(m.group(1)), k) for k in state for m in [re.match(r"mlp\.layers\.(\d+)\.weight$", k)] if m)
    for _, k in head:
        take(k, "head." + k.removeprefix("mlp."))
        take(k.replace(".weight", ".bias"), "head." + k.removeprefix("mlp.").replace(".weight", ".bias"))
    head_dims = [state[head[0][1]].shape[1]] + [state[k].shape[0] for _, k in head]
    unknown = sorted(k for k in state if k not in used and not k.startswith(_IR_DROPPED))
    if unknown:
        raise ValueError(f"ImageReward state dict has keys this converter does not map: {unknown[:8]}")
    config = {"vision_config": vision_config, "text_config": text_config, "head_dims": head_dims}
    return config, out
