"""PickScore, HPSv2/v2.1 and ImageReward (flowkern.rewards) on tiny random weights, offline (docs/ecosystem.md (c)).

The converters are checked against reference forwards written here from the original architectures (open_clip's
CLIP with fused q/k/v and ``x @ proj`` projections; BLIP's timm ViT + med.py BERT with cross-attention + the
ImageReward MLP), evaluated directly on state dicts in the original key layouts. fp64 comparisons are exact up
to summation order (tolerance 1e-9).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from flowkern.profiling import peak_memory  # noqa: E402
from flowkern.rewards import (  # noqa: E402
    HPSReward,
    HPSv21Reward,
    ImageRewardModel,
    ImageRewardReward,
    PickScoreReward,
    build_reward,
    build_weighted_reward,
    clip_from_open_clip,
    clip_preprocess,
    imagereward_to_transformers,
    open_clip_to_transformers,
)
from flowkern.rewards.image_reward import IMAGEREWARD_MEAN, IMAGEREWARD_STD  # noqa: E402
from tests.rewards_originals import one_thread, tiny_bert_tokenizer, tiny_clip_tokenizer  # noqa: E402, F401

PROMPTS = ["a red cat", "blue sky"]
CTX = 20  # tiny text context (77 in the released models)


def _images(b: int = 2, h: int = 40, w: int = 36, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g, dtype=torch.float64).to(dtype)


def _clip_tokenizer():
    return tiny_clip_tokenizer()


def _bert_tokenizer():
    return tiny_bert_tokenizer()


def _hf_clip(tok, seed: int = 0, layers: int = 2, image_size: int = 32, patch: int = 4):
    from transformers import CLIPConfig, CLIPModel

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(tok), max_position_embeddings=CTX, hidden_act="gelu", **ids),
        vision_config=dict(image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=layers, num_attention_heads=4, hidden_act="gelu"),
        projection_dim=16,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(cfg).eval()


def _randn(g, *shape, std=0.1, mean=0.0):
    return torch.randn(*shape, generator=g) * std + mean


def _ln_params(g, sd, prefix, width):
    sd[prefix + ".weight"] = _randn(g, width, std=0.1, mean=1.0)
    sd[prefix + ".bias"] = _randn(g, width, std=0.05)


def _linear_params(g, sd, prefix, out_dim, in_dim, bias=True):
    sd[prefix + ".weight"] = _randn(g, out_dim, in_dim, std=1.0 / math.sqrt(in_dim))
    if bias:
        sd[prefix + ".bias"] = _randn(g, out_dim, std=0.05)


# ---------------------------------------------------------------- open_clip layout + reference forward
OC = dict(v_width=32, v_layers=2, v_heads=4, patch=8, image=32, t_width=24, t_layers=2, t_heads=3, embed=16)


def _open_clip_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random open_clip CLIP state dict in the original key layout (ViT-H-14 structure, tiny sizes)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    vw, tw, grid = OC["v_width"], OC["t_width"], OC["image"] // OC["patch"]

    def blocks(prefix, width, n):
        for i in range(n):
            p = f"{prefix}.{i}"
            _ln_params(g, sd, p + ".ln_1", width)
            sd[p + ".attn.in_proj_weight"] = _randn(g, 3 * width, width, std=1.0 / math.sqrt(width))
            sd[p + ".attn.in_proj_bias"] = _randn(g, 3 * width, std=0.05)
            _linear_params(g, sd, p + ".attn.out_proj", width, width)
            _ln_params(g, sd, p + ".ln_2", width)
            _linear_params(g, sd, p + ".mlp.c_fc", 4 * width, width)
            _linear_params(g, sd, p + ".mlp.c_proj", width, 4 * width)

    sd["visual.class_embedding"] = _randn(g, vw, std=0.5)
    sd["visual.positional_embedding"] = _randn(g, grid * grid + 1, vw, std=0.2)
    sd["visual.proj"] = _randn(g, vw, OC["embed"], std=1.0 / math.sqrt(vw))
    sd["visual.conv1.weight"] = _randn(g, vw, 3, OC["patch"], OC["patch"], std=0.05)
    _ln_params(g, sd, "visual.ln_pre", vw)
    _ln_params(g, sd, "visual.ln_post", vw)
    blocks("visual.transformer.resblocks", vw, OC["v_layers"])
    sd["token_embedding.weight"] = _randn(g, vocab, tw, std=0.5)
    sd["positional_embedding"] = _randn(g, CTX, tw, std=0.2)
    blocks("transformer.resblocks", tw, OC["t_layers"])
    _ln_params(g, sd, "ln_final", tw)
    sd["text_projection"] = _randn(g, tw, OC["embed"], std=1.0 / math.sqrt(tw))
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    sd["attn_mask"] = torch.full((CTX, CTX), float("-inf")).triu(1)  # buffer some open_clip versions save
    return sd


def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=eps)


def _attention(q, k, v, heads, additive_mask=None):
    b, n, w = q.shape
    d = w // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if additive_mask is not None:
        scores = scores + additive_mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)


def _oc_resblock(x, sd, p, heads, mask=None):
    h = _ln(x, sd, p + ".ln_1", 1e-5)
    q, k, v = (h @ sd[p + ".attn.in_proj_weight"].T + sd[p + ".attn.in_proj_bias"]).chunk(3, dim=-1)
    x = x + F.linear(_attention(q, k, v, heads, mask), sd[p + ".attn.out_proj.weight"], sd[p + ".attn.out_proj.bias"])
    h = _ln(x, sd, p + ".ln_2", 1e-5)
    h = F.linear(F.gelu(F.linear(h, sd[p + ".mlp.c_fc.weight"], sd[p + ".mlp.c_fc.bias"])),
                 sd[p + ".mlp.c_proj.weight"], sd[p + ".mlp.c_proj.bias"])  # fmt: skip
    return x + h


def _oc_encode_image(sd, pixels):
    conv = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    x = (
        torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
        + sd["visual.positional_embedding"]
    )
    x = _ln(x, sd, "visual.ln_pre", 1e-5)
    for i in range(OC["v_layers"]):
        x = _oc_resblock(x, sd, f"visual.transformer.resblocks.{i}", OC["v_heads"])
    return _ln(x[:, 0], sd, "visual.ln_post", 1e-5) @ sd["visual.proj"]


def _oc_encode_text(sd, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1],) * 2, float("-inf"), dtype=x.dtype).triu(1)
    for i in range(OC["t_layers"]):
        x = _oc_resblock(x, sd, f"transformer.resblocks.{i}", OC["t_heads"], causal)
    x = _ln(x, sd, "ln_final", 1e-5)
    return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]  # eot = largest id


# ---------------------------------------------------------------- ImageReward layout + reference forward
IR = dict(v_width=32, v_layers=2, v_heads=4, patch=8, image=32, t_width=24, t_layers=2, t_heads=3, t_inter=48)
IR_HEAD = (24, 16, 12, 8, 4, 1)
MED_CONFIG = {"num_attention_heads": IR["t_heads"], "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}


def _imagereward_state(vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random ImageReward.pt state dict in the original layout (BLIP ViT + med.py BERT + MLP), tiny sizes."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    vw, tw, grid = IR["v_width"], IR["t_width"], IR["image"] // IR["patch"]
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    sd[v + "cls_token"] = _randn(g, 1, 1, vw, std=0.5)
    sd[v + "pos_embed"] = _randn(g, 1, grid * grid + 1, vw, std=0.2)
    sd[v + "patch_embed.proj.weight"] = _randn(g, vw, 3, IR["patch"], IR["patch"], std=0.05)
    sd[v + "patch_embed.proj.bias"] = _randn(g, vw, std=0.05)
    for i in range(IR["v_layers"]):
        p = f"{v}blocks.{i}"
        _ln_params(g, sd, p + ".norm1", vw)
        _linear_params(g, sd, p + ".attn.qkv", 3 * vw, vw)
        _linear_params(g, sd, p + ".attn.proj", vw, vw)
        _ln_params(g, sd, p + ".norm2", vw)
        _linear_params(g, sd, p + ".mlp.fc1", 4 * vw, vw)
        _linear_params(g, sd, p + ".mlp.fc2", vw, 4 * vw)
    _ln_params(g, sd, v + "norm", vw)
    sd[t + "embeddings.position_ids"] = torch.arange(40)[None]
    sd[t + "embeddings.word_embeddings.weight"] = _randn(g, vocab, tw, std=0.5)
    sd[t + "embeddings.position_embeddings.weight"] = _randn(g, 40, tw, std=0.2)
    _ln_params(g, sd, t + "embeddings.LayerNorm", tw)
    for i in range(IR["t_layers"]):
        p = f"{t}encoder.layer.{i}"
        for kind, kv_width in (("attention", tw), ("crossattention", vw)):
            _linear_params(g, sd, f"{p}.{kind}.self.query", tw, tw)
            _linear_params(g, sd, f"{p}.{kind}.self.key", tw, kv_width)
            _linear_params(g, sd, f"{p}.{kind}.self.value", tw, kv_width)
            _linear_params(g, sd, f"{p}.{kind}.output.dense", tw, tw)
            _ln_params(g, sd, f"{p}.{kind}.output.LayerNorm", tw)
        _linear_params(g, sd, p + ".intermediate.dense", IR["t_inter"], tw)
        _linear_params(g, sd, p + ".output.dense", tw, IR["t_inter"])
        _ln_params(g, sd, p + ".output.LayerNorm", tw)
    _linear_params(g, sd, "blip.vision_proj", 8, vw)  # contrastive heads: in the checkpoint, unused by the score
    _linear_params(g, sd, "blip.text_proj", 8, tw)
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(IR_HEAD[:-1], IR_HEAD[1:])):
        _linear_params(g, sd, f"mlp.layers.{idx}", o, i)
    return sd


def _blip_vit(sd, pixels):
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=IR["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[v + "pos_embed"][:, : x.shape[1] + 1]
    for i in range(IR["v_layers"]):
        p = f"{v}blocks.{i}"
        q, k, val = F.linear(
            _ln(x, sd, p + ".norm1", 1e-6), sd[p + ".attn.qkv.weight"], sd[p + ".attn.qkv.bias"]
        ).chunk(3, dim=-1)
        x = x + F.linear(_attention(q, k, val, IR["v_heads"]), sd[p + ".attn.proj.weight"], sd[p + ".attn.proj.bias"])
        h = F.gelu(F.linear(_ln(x, sd, p + ".norm2", 1e-6), sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"])
    return _ln(x, sd, v + "norm", 1e-6)


def _bert_attention(x, sd, p, context, additive_mask):
    lin = lambda name, inp: F.linear(inp, sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"])
    a = _attention(
        lin("self.query", x), lin("self.key", context), lin("self.value", context), IR["t_heads"], additive_mask
    )
    return _ln(lin("output.dense", a) + x, sd, p + ".output.LayerNorm", 1e-12)


def _imagereward_reference(sd, pixels, ids, mask):
    """score_gard of the original: ViT tokens -> BERT with cross-attention -> [CLS] -> MLP -> normalise."""
    t = "blip.text_encoder."
    image_tokens = _blip_vit(sd, pixels)
    pos = sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = _ln(sd[t + "embeddings.word_embeddings.weight"][ids] + pos, sd, t + "embeddings.LayerNorm", 1e-12)
    additive = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0  # BERT's extended attention mask
    for i in range(IR["t_layers"]):
        p = f"{t}encoder.layer.{i}"
        x = _bert_attention(x, sd, p + ".attention", x, additive)
        x = _bert_attention(x, sd, p + ".crossattention", image_tokens, None)  # all image tokens valid
        h = F.gelu(F.linear(x, sd[p + ".intermediate.dense.weight"], sd[p + ".intermediate.dense.bias"]))
        x = _ln(
            F.linear(h, sd[p + ".output.dense.weight"], sd[p + ".output.dense.bias"]) + x,
            sd,
            p + ".output.LayerNorm",
            1e-12,
        )
    r = x[:, 0]
    for idx in (0, 2, 4, 6, 7):  # Linear stack, no activations (dropout is identity in eval)
        r = F.linear(r, sd[f"mlp.layers.{idx}.weight"], sd[f"mlp.layers.{idx}.bias"])
    return (r.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def _to64(sd):
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip_tok():
    return _clip_tokenizer()


@pytest.fixture(scope="module")
def bert_tok():
    return _bert_tokenizer()


@pytest.fixture(scope="module")
def oc_state(clip_tok):
    return _open_clip_state(len(clip_tok))


@pytest.fixture(scope="module")
def ir_state(bert_tok):
    return _imagereward_state(len(bert_tok))


def _hps(oc_state, clip_tok, dtype=torch.float32, **kwargs) -> HPSReward:
    clip = clip_from_open_clip(oc_state, vision_heads=OC["v_heads"], text_heads=OC["t_heads"])
    return HPSReward(clip.to(dtype), clip_tok, **kwargs)


def _imagereward(ir_state, bert_tok, dtype=torch.float32, **kwargs) -> ImageRewardReward:
    model = ImageRewardModel.from_original(ir_state, med_config=MED_CONFIG, vision_heads=IR["v_heads"])
    return ImageRewardReward(model.to(dtype), bert_tok, **kwargs)


# ---------------------------------------------------------------- PickScore
def test_pickscore_equals_transformers_logits(clip_tok):
    clip = _hf_clip(clip_tok)
    reward = PickScoreReward(clip, clip_tok)
    images = _images()
    tokens = clip_tok(PROMPTS, padding="max_length", max_length=CTX, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = clip(**tokens, pixel_values=clip_preprocess(images, 32)).logits_per_image.diagonal()  # scale * cos
    out = reward(images, PROMPTS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert abs(reward.logit_scale.item() - clip.logit_scale.exp().item()) < 1e-6 and reward.logit_scale.item() > 2
    with pytest.raises(TypeError, match="logit_scale"):
        PickScoreReward(clip, clip_tok, scale=100.0)


# ---------------------------------------------------------------- open_clip converter and HPS
def test_open_clip_converter_matches_reference_forward(oc_state, clip_tok):
    config, converted = open_clip_to_transformers(oc_state, vision_heads=OC["v_heads"], text_heads=OC["t_heads"])
    assert config.vision_config.image_size == 32 and config.vision_config.patch_size == 8
    assert config.text_config.num_hidden_layers == 2 and config.projection_dim == 16
    assert config.text_config.eos_token_id == len(clip_tok) - 1 == clip_tok.eos_token_id
    assert torch.equal(converted["visual_projection.weight"], oc_state["visual.proj"].T)
    q = converted["vision_model.encoder.layers.1.self_attn.q_proj.weight"]
    v = converted["vision_model.encoder.layers.1.self_attn.v_proj.weight"]
    fused = oc_state["visual.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(q, fused[:32]) and torch.equal(v, fused[64:])

    clip = clip_from_open_clip(_to64(oc_state), vision_heads=OC["v_heads"], text_heads=OC["t_heads"])
    assert clip.dtype == torch.float64 and not any(p.requires_grad for p in clip.parameters())
    sd64 = _to64(oc_state)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ids = clip_tok(PROMPTS, padding="max_length", max_length=CTX, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        img = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        txt = clip.text_projection(clip.text_model(input_ids=ids).pooler_output)
        img_ref, txt_ref = _oc_encode_image(sd64, pixels), _oc_encode_text(sd64, ids)
    assert img_ref.abs().max() > 0.1 and (img_ref[0] - img_ref[1]).abs().max() > 1e-3  # non-degenerate
    torch.testing.assert_close(img, img_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(txt, txt_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(clip.logit_scale, sd64["logit_scale"])

    # released-checkpoint wrappers: {'state_dict': ...} and a DDP 'module.' prefix convert identically
    wrapped = {"state_dict": {f"module.{k}": v for k, v in oc_state.items()}, "epoch": 3}
    _, again = open_clip_to_transformers(wrapped, vision_heads=OC["v_heads"], text_heads=OC["t_heads"])
    assert again.keys() == converted.keys() and all(torch.equal(again[k], converted[k]) for k in converted)


def test_hps_score_matches_open_clip_reference(oc_state, clip_tok):
    reward = _hps(_to64(oc_state), clip_tok, dtype=torch.float64)
    assert reward.crop_offset == "round"
    images = _images(h=47, w=32, dtype=torch.float64)  # 47 - 32 = 15 = 3 mod 4: torchvision's crop offset differs
    sd64 = _to64(oc_state)
    ids = clip_tok(PROMPTS, padding="max_length", max_length=CTX, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        pixels = clip_preprocess(images, 32, crop_offset="round")
        ref = F.cosine_similarity(_oc_encode_image(sd64, pixels), _oc_encode_text(sd64, ids), dim=-1)
        floor = F.cosine_similarity(
            _oc_encode_image(sd64, clip_preprocess(images, 32)), _oc_encode_text(sd64, ids), dim=-1
        )
    out = reward(images, PROMPTS)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    assert (out - floor).abs().max() > 1e-6  # the crop offset is visible in the score
    x100 = HPSReward(reward.clip, clip_tok, scale=100.0)(images, PROMPTS)
    torch.testing.assert_close(x100, 100 * ref, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- ImageReward converter
def test_imagereward_converter_matches_reference_forward(ir_state, bert_tok):
    config, converted = imagereward_to_transformers(ir_state, med_config=MED_CONFIG, vision_heads=IR["v_heads"])
    assert config["head_dims"] == list(IR_HEAD)
    assert config["vision_config"]["layer_norm_eps"] == 1e-6 and config["vision_config"]["image_size"] == 32
    assert config["text_config"]["encoder_hidden_size"] == 32 and config["text_config"]["num_attention_heads"] == 3
    assert not any(k.startswith(("blip.", "mlp.")) or "position_ids" in k for k in converted)

    sd64 = _to64(ir_state)
    reward = _imagereward(sd64, bert_tok, dtype=torch.float64)
    images = _images(h=47, w=32, dtype=torch.float64)
    tokens = bert_tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"][0, 0] == bert_tok.cls_token_id and tokens["attention_mask"][0, -1] == 0  # padded
    with torch.no_grad():
        pixels = clip_preprocess(images, 32, crop_offset="round")
        ref = _imagereward_reference(sd64, pixels, tokens["input_ids"], tokens["attention_mask"])
        direct = reward.model(pixels, tokens["input_ids"], tokens["attention_mask"])
    out = reward(images, PROMPTS)
    assert ref.abs().max() > 0.05 and (ref[0] - ref[1]).abs() > 1e-4  # non-degenerate
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(direct, ref, rtol=0, atol=1e-9)
    # padding is masked: changing the padded ids leaves the score unchanged
    ids2 = tokens["input_ids"].clone()
    ids2[tokens["attention_mask"] == 0] = 7
    with torch.no_grad():
        torch.testing.assert_close(reward.model(pixels, ids2, tokens["attention_mask"]), ref, rtol=0, atol=1e-9)


def test_converters_reject_foreign_layouts(oc_state, ir_state):
    with pytest.raises(ValueError, match="does not map"):
        open_clip_to_transformers({**oc_state, "visual.attn_pool.query": torch.zeros(2)}, vision_heads=4, text_heads=3)
    with pytest.raises(ValueError, match="missing"):
        open_clip_to_transformers({k: v for k, v in oc_state.items() if k != "visual.proj"})
    with pytest.raises(ValueError, match="divisible"):
        open_clip_to_transformers(oc_state, vision_heads=5, text_heads=3)
    with pytest.raises(ValueError, match="does not map"):
        imagereward_to_transformers({**ir_state, "blip.itm_head.weight": torch.zeros(2)}, vision_heads=4)
    with pytest.raises(ValueError, match="not an ImageReward"):
        imagereward_to_transformers(oc_state)
    with pytest.raises(TypeError, match="mapping"):
        open_clip_to_transformers([1, 2])


# ---------------------------------------------------------------- gradients
def _gradcheck_pixels(reward, prompts):
    base = _images(b=1, h=40, w=36, dtype=torch.float64).clamp(0.05, 0.95)
    idx = torch.tensor([[0, 0, 3, 5], [0, 1, 20, 17], [0, 2, 39, 35]])

    def f(p):
        return reward(base.index_put(tuple(idx.T), p), prompts)

    p = base[tuple(idx.T)].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (p,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_on_pixels_float64(oc_state, ir_state, clip_tok, bert_tok):
    rewards = [
        PickScoreReward(_hf_clip(clip_tok).double(), clip_tok),
        _hps(_to64(oc_state), clip_tok, dtype=torch.float64),
        _imagereward(_to64(ir_state), bert_tok, dtype=torch.float64, checkpoint=True),
    ]
    for reward in rewards:
        _gradcheck_pixels(reward, PROMPTS[:1])


def test_checkpointing_same_gradients_lower_peak_memory(ir_state, clip_tok, bert_tok):
    """Per-layer checkpointing: bitwise-equal pixel gradients; exact CPU peak (profiler) of forward + backward."""
    images = _images(b=2, h=64, w=64)

    def run(reward):
        x = images.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(reward(x, PROMPTS).sum(), x)
        return grad

    clip = _hf_clip(clip_tok, layers=6, image_size=64, patch=4)  # 257 tokens: attention dominates activations
    plain = PickScoreReward(clip, clip_tok)
    lean = PickScoreReward(_hf_clip(clip_tok, layers=6, image_size=64, patch=4), clip_tok, checkpoint=True)
    assert lean.checkpointing and not plain.checkpointing
    assert lean.state_dict().keys() == plain.state_dict().keys()  # checkpointing leaves the weights' names alone
    g_plain, g_lean = run(plain), run(lean)
    assert torch.equal(g_plain, g_lean)
    torch.testing.assert_close(lean(images, PROMPTS), plain(images, PROMPTS), rtol=0, atol=0)
    run(plain), run(lean)  # warm caches (text features) before measuring
    peak_plain, peak_lean = peak_memory(lambda: run(plain)), peak_memory(lambda: run(lean))
    assert peak_lean < 0.6 * peak_plain, (peak_lean, peak_plain)
    lean.set_checkpointing(False)
    assert not lean.checkpointing and torch.equal(run(lean), g_plain)

    ir_plain, ir_lean = _imagereward(ir_state, bert_tok), _imagereward(ir_state, bert_tok, checkpoint=True)
    assert ir_lean.checkpointing and torch.equal(run(ir_plain), run(ir_lean))


def test_bf16_towers_fp32_scores(oc_state, ir_state, clip_tok, bert_tok, tmp_path):
    images = _images().requires_grad_(True)
    for reward, ref in (
        (_hps(oc_state, clip_tok, dtype=torch.bfloat16), _hps(oc_state, clip_tok)),
        (
            PickScoreReward(_hf_clip(clip_tok).to(torch.bfloat16), clip_tok),
            PickScoreReward(_hf_clip(clip_tok), clip_tok),
        ),
    ):
        out = reward(images, PROMPTS)
        assert reward.dtype == torch.bfloat16 and out.dtype == torch.float32
        torch.testing.assert_close(
            out, ref(images, PROMPTS), rtol=0.05, atol=0.05 * ref(images, PROMPTS).abs().max().item()
        )
        (grad,) = torch.autograd.grad(out.sum(), images)
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model = ImageRewardModel.from_original(ir_state, med_config=MED_CONFIG, vision_heads=4, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.head.layers[0].weight.dtype == torch.float32  # head stays fp32
    reward, ref = ImageRewardReward(model, bert_tok, checkpoint=True), _imagereward(ir_state, bert_tok)
    out = reward(images, PROMPTS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref(images, PROMPTS), rtol=0.05, atol=0.1)
    (grad,) = torch.autograd.grad(out.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------- preprocessing vs the reference processors
def _smooth_uint8(h: int, w: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(1, 3, h // 4 + 1, w // 4 + 1, generator=g), size=(h, w), mode="bilinear")
    return (smooth[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def _torchvision_style_reference(u8: np.ndarray, size: int) -> torch.Tensor:
    """open_clip / ImageReward eval transform, from its definition, on PIL: Resize(size, BICUBIC) (short side,
    long side int(size * long / short)), CenterCrop(size) (offset round((H - size) / 2)), ToTensor, Normalize."""
    from PIL import Image

    from flowkern.rewards import CLIP_MEAN, CLIP_STD

    img = Image.fromarray(u8)
    w, h = img.size
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = round((nh - size) / 2), round((nw - size) / 2)
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize(("h", "w"), [(300, 260), (263, 224), (250, 316)])
def test_preprocessing_matches_reference_processors(h, w):
    from PIL import Image
    from transformers import CLIPImageProcessor

    u8 = _smooth_uint8(h, w, seed=h + w)
    x = torch.from_numpy(np.ascontiguousarray(u8)).permute(2, 0, 1)[None].float() / 255
    # PickScore: the laion ViT-H-14 CLIPImageProcessor (shortest_edge 224, crop 224, bicubic, CLIP mean/std)
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    ref = proc(images=Image.fromarray(u8), return_tensors="pt")["pixel_values"]
    diff = (clip_preprocess(x, 224) - ref).abs()
    assert diff.max() < 0.03 and diff.mean() < 0.008, (diff.max().item(), diff.mean().item())
    # HPS / ImageReward: torchvision-style Resize + CenterCrop
    ref = _torchvision_style_reference(u8, 224)
    ours = clip_preprocess(x, 224, crop_offset="round")
    diff = (ours - ref).abs()
    assert diff.max() < 0.03 and diff.mean() < 0.008, (diff.max().item(), diff.mean().item())
    if (int(224 * max(h, w) / min(h, w)) - 224) % 4 == 3:  # floor and round-half-even crop offsets differ
        floor = (clip_preprocess(x, 224) - ref).abs().mean()
        assert floor > 2 * diff.mean(), (floor.item(), diff.mean().item())
    if min(h, w) == 224:  # no resize: only crop and normalisation, identical
        assert diff.max() < 1e-5


# ---------------------------------------------------------------- loading round trips
def test_local_round_trips(oc_state, ir_state, clip_tok, bert_tok, tmp_path):
    images = _images()
    # PickScore: save_pretrained directory -> build_reward
    pick = PickScoreReward(_hf_clip(clip_tok), clip_tok)
    pick.save_pretrained(tmp_path / "pick")
    loaded = build_reward("PickScore", tmp_path / "pick", local_files_only=True)
    assert isinstance(loaded, PickScoreReward)
    torch.testing.assert_close(loaded(images, PROMPTS), pick(images, PROMPTS), rtol=0, atol=0)

    # HPS: released-style .pt ({'state_dict': ...}) -> converted -> save_pretrained -> reload
    torch.save({"state_dict": oc_state}, tmp_path / "HPS_v2.1_compressed.pt")
    clip_tok.save_pretrained(tmp_path / "cliptok")
    kw = dict(tokenizer=tmp_path / "cliptok", vision_heads=4, text_heads=3, local_files_only=True)
    hps = build_reward("hps-v2.1", tmp_path / "HPS_v2.1_compressed.pt", **kw)
    assert type(hps) is HPSv21Reward
    ref = _hps(oc_state, clip_tok)(images, PROMPTS)
    torch.testing.assert_close(hps(images, PROMPTS), ref, rtol=0, atol=0)
    hps.save_pretrained(tmp_path / "hps")
    again = build_reward("hpsv2", tmp_path / "hps", local_files_only=True, checkpoint=True)
    assert type(again) is HPSReward and again.checkpointing
    torch.testing.assert_close(again(images, PROMPTS), ref, rtol=0, atol=0)

    # ImageReward: ImageReward.pt + med_config.json -> converted -> save_pretrained -> reload
    torch.save(ir_state, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(MED_CONFIG))
    bert_tok.save_pretrained(tmp_path / "berttok")
    ir = build_reward(
        "image_reward", tmp_path / "ImageReward.pt", tokenizer=tmp_path / "berttok",
        med_config=tmp_path / "med_config.json", vision_heads=4, local_files_only=True,
    )  # fmt: skip
    assert len(ir.tokenizer) == len(bert_tok)  # BLIP tokens already present: not added twice
    ref = _imagereward(ir_state, bert_tok)(images, PROMPTS)
    torch.testing.assert_close(ir(images, PROMPTS), ref, rtol=0, atol=0)
    ir.save_pretrained(tmp_path / "ir")
    again = build_reward("ImageReward", tmp_path / "ir", local_files_only=True)
    torch.testing.assert_close(again(images, PROMPTS), ref, rtol=0, atol=0)
    assert len(again._token_cache) == 2
    bf16 = build_reward("imagereward", tmp_path / "ir", local_files_only=True, torch_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16

    # weighted sum of rewards from local files
    total = build_weighted_reward(
        {
            "pick": {"name": "pickscore", "weight": 0.5, "args": [tmp_path / "pick"], "local_files_only": True},
            "imagereward": {"weight": 2.0, "args": [tmp_path / "ir"], "local_files_only": True},
        }
    )
    expected = 0.5 * pick(images, PROMPTS) + 2.0 * ref
    torch.testing.assert_close(total(images, PROMPTS), expected, rtol=1e-6, atol=1e-6)
    assert set(total.last_outputs) == {"pick", "imagereward"}


# ---------------------------------------------------------------- frozen, eval, bad input
def test_frozen_eval_and_bad_inputs(oc_state, ir_state, clip_tok, bert_tok, tmp_path):
    rewards = [
        PickScoreReward(_hf_clip(clip_tok), clip_tok),
        _hps(oc_state, clip_tok),
        _imagereward(ir_state, bert_tok),
    ]
    good = _images()
    for reward in rewards:
        reward.train()
        assert not reward.training and not any(p.requires_grad for p in reward.parameters())
        assert not any(m.training for m in reward.modules())
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            reward(good * 2 - 1, PROMPTS)
        with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
            reward(good[:, :2], PROMPTS)
        with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
            reward(good[0], PROMPTS)
        with pytest.raises(ValueError, match="3 prompts for a batch of 2"):
            reward(good, PROMPTS + ["x"])
        with pytest.raises(ValueError, match="needs one prompt"):
            reward(good)
    known = r"\['aesthetic', 'brightness', 'bump', 'clipscore', 'hpsv2', 'hpsv2.1', 'imagereward', 'linear', "
    known += r"'pickscore', 'redness'\]"  # one registry: model, pixel and toy rewards
    with pytest.raises(ValueError, match=r"unknown reward 'hpsv3'; known: " + known):
        build_reward("hpsv3", tmp_path)
    with pytest.raises(ValueError, match="unknown reward 'nope'"):  # checked before anything loads
        build_weighted_reward({"a": {"name": "pickscore", "args": [tmp_path / "missing"]}, "nope": {}})
    with pytest.raises(TypeError, match="ImageRewardModel"):
        ImageRewardReward(torch.nn.Linear(2, 2), bert_tok)
    with pytest.raises(ValueError, match="tokenizer has"):
        ImageRewardReward(ImageRewardModel.from_original(ir_state, med_config=MED_CONFIG, vision_heads=4), clip_tok)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ImageRewardModel.from_pretrained(tmp_path)
