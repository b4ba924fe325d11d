"""Rewards (flowkern.rewards) on tiny random-weight CLIP models built from config (docs/ecosystem.md (c)).

Preprocessing vs transformers' CLIPImageProcessor (PIL bicubic + uint8 round trip) on smooth images: measured
max |diff| ~0.016 and mean ~0.0045 in normalised units (about one uint8 level / std), 0 when no resize is
needed; the tolerances below are 0.03 (max) and 0.008 (mean). On hard edges (nearest-upsampled blocks) the
max difference reaches ~0.3 (PIL and torch bicubic kernels ring differently) while the mean stays ~0.007.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from flowkern.rewards import (  # noqa: E402
    AestheticHead,
    AestheticReward,
    CLIPScoreReward,
    WeightedReward,
    apply_clamp,
    build_reward,
    clip_preprocess,
)

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    end = "<|endoftext|>"
    return CLIPTokenizer(
        vocab=vocab, merges=[], unk_token=end, bos_token="<|startoftext|>", eos_token=end, pad_token=end,
        model_max_length=77,
    )  # fmt: skip


def _clip(tok, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=len(tok), max_position_embeddings=77, **ids,
        ),
        vision_config=dict(image_size=32, patch_size=4, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(cfg).eval()


def _head(seed: int = 1) -> AestheticHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AestheticHead((16, 12, 8, 6, 4, 1)).eval()


@pytest.fixture(scope="module")
def parts():
    tok = _tokenizer()
    return tok, _clip(tok), _head()


def _images(b: int = 2, h: int = 40, w: int = 36, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g, dtype=torch.float64).to(dtype)


PROMPTS = ["a red cat", "blue sky"]


# ---------------------------------------------------------------- preprocessing
@pytest.mark.parametrize(("h", "w", "size"), [(40, 56, 32), (300, 260, 224), (32, 32, 32)])
def test_preprocess_matches_clip_image_processor(h, w, size):
    from PIL import Image
    from transformers import CLIPImageProcessor

    g = torch.Generator().manual_seed(h)
    smooth = torch.nn.functional.interpolate(
        torch.rand(1, 3, h // 4 + 1, w // 4 + 1, generator=g), size=(h, w), mode="bilinear"
    )
    u8 = (smooth[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    ref = proc(images=Image.fromarray(u8), return_tensors="pt")["pixel_values"]
    ours = clip_preprocess(torch.from_numpy(np.ascontiguousarray(u8)).permute(2, 0, 1)[None].float() / 255, size)
    assert ours.shape == ref.shape == (1, 3, size, size)
    diff = (ours - ref).abs()
    if (h, w) == (size, size):
        assert diff.max() < 1e-5  # no resize: only the normalisation, identical
    assert diff.max() < 0.03 and diff.mean() < 0.008, (diff.max().item(), diff.mean().item())


def test_clamp_modes():
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)  # the bounds keep their gradient on any torch
    for mode, grad in (("hard", [0.0, 1.0, 1.0, 1.0, 0.0]), ("straight_through", [1.0] * 5)):
        y = apply_clamp(x, mode)
        assert torch.equal(y.detach(), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.equal(g, torch.tensor(grad))
    with pytest.raises(ValueError, match="clamp"):
        apply_clamp(x, "soft")


# ---------------------------------------------------------------- scores and gradients
def test_clipscore_equals_transformers_logits(parts):
    tok, clip, _ = parts
    reward = CLIPScoreReward(clip, tok, scale=100.0)
    images = _images()
    ours = reward(images, PROMPTS)
    tokens = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = clip(**tokens, pixel_values=clip_preprocess(images, 32))
    ref = 100.0 * out.logits_per_image.diagonal() / clip.logit_scale.exp()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    assert ours.shape == (2,) and ours.dtype == torch.float32
    assert len(reward._text_cache) == 2  # each prompt encoded once
    reward(images, PROMPTS[::-1])
    assert len(reward._text_cache) == 2


def test_aesthetic_equals_manual_pipeline(parts):
    _, clip, head = parts
    reward = AestheticReward(clip, head)
    images = _images()
    with torch.no_grad():
        emb = clip.visual_projection(clip.vision_model(pixel_values=clip_preprocess(images, 32)).pooler_output)
        ref = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(reward(images, PROMPTS), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reward(images), ref, rtol=1e-5, atol=1e-6)  # prompts unused
    assert not any(p.requires_grad for p in reward.parameters())
    reward.train()
    assert not reward.training  # stays in eval mode


def test_gradcheck_on_pixels_float64(parts):
    tok, clip, head = parts
    clip64, head64 = _clip(tok).double(), _head().double()
    rewards = [CLIPScoreReward(clip64, tok), AestheticReward(clip64, head64)]
    base = _images(b=1, h=40, w=36, dtype=torch.float64).clamp(0.05, 0.95)
    idx = torch.tensor([[0, 0, 3, 5], [0, 1, 20, 17], [0, 2, 39, 35], [0, 0, 12, 30]])

    for reward in rewards:

        def f(p, reward=reward):
            img = base.index_put(tuple(idx.T), p)
            return reward(img, PROMPTS[:1])

        p = base[tuple(idx.T)].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(f, (p,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradients_reach_pixels_and_weighted_sum(parts):
    tok, clip, head = parts
    score, aesthetic = CLIPScoreReward(clip, tok, scale=100.0), AestheticReward(clip, head)
    total = WeightedReward({"clip": score, "aesthetic": aesthetic}, {"clip": 0.5, "aesthetic": 2.0})
    images = _images().requires_grad_(True)
    value = total(images, PROMPTS)
    expected = 0.5 * score(images, PROMPTS) + 2.0 * aesthetic(images, PROMPTS)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    assert set(total.last_outputs) == {"clip", "aesthetic"}
    torch.testing.assert_close(total.last_outputs["aesthetic"], aesthetic(images, PROMPTS).detach())
    (grad,) = torch.autograd.grad(value.sum(), images)
    assert torch.isfinite(grad).all() and (grad.abs().sum(dim=(1, 2, 3)) > 0).all()
    with pytest.raises(ValueError, match="weights keys"):
        WeightedReward({"clip": score}, {"other": 1.0})


def test_bf16_tower_fp32_scores(parts):
    tok, _, head = parts
    reward = CLIPScoreReward(_clip(tok).to(torch.bfloat16), tok)
    images = _images().requires_grad_(True)
    out = reward(images, PROMPTS)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.sum(), images)
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


# ---------------------------------------------------------------- loading
def test_local_round_trip(parts, tmp_path):
    from safetensors.torch import save_file

    tok, clip, head = parts
    clip.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    torch.save({f"module.{k}": v for k, v in head.state_dict().items()}, tmp_path / "head.pth")  # original layout
    images = _images()

    loaded = build_reward("clipscore", tmp_path / "clip", local_files_only=True, scale=100.0)
    torch.testing.assert_close(loaded(images, PROMPTS), CLIPScoreReward(clip, tok, scale=100.0)(images, PROMPTS))
    ref = AestheticReward(clip, head)(images, PROMPTS)
    for file in ("head.safetensors", "head.pth"):
        aes = build_reward("aesthetic", tmp_path / "clip", tmp_path / file, local_files_only=True)
        assert aes.head.dims == (16, 12, 8, 6, 4, 1)
        torch.testing.assert_close(aes(images, PROMPTS), ref, rtol=0, atol=0)
    bf16 = AestheticReward.from_pretrained(
        tmp_path / "clip", tmp_path / "head.safetensors", local_files_only=True, torch_dtype=torch.bfloat16
    )
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16(images, PROMPTS), ref, rtol=0.05, atol=0.05)


def test_default_aesthetic_head_layout():
    head = AestheticHead()
    keys = [k for k in head.state_dict() if k.endswith("weight")]
    assert keys == [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]  # sac+logos+ava1-l14-linearMSE.pth
    assert head.dims == (768, 1024, 128, 64, 16, 1)
    assert head(torch.zeros(2, 768)).shape == (2, 1)


# ---------------------------------------------------------------- bad input
def test_bad_inputs(parts):
    tok, clip, head = parts
    reward = CLIPScoreReward(clip, tok)
    good = _images()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(good * 2 - 1, PROMPTS)  # [-1, 1] decoder output passed directly
    reward(good.clamp(0, 1) + 5e-4, PROMPTS)  # within the tolerance
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(good[:, :1], PROMPTS)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(good[0], PROMPTS)
    with pytest.raises(TypeError, match="floating"):
        reward((good * 255).to(torch.uint8), PROMPTS)
    with pytest.raises(ValueError, match="NaN"):
        reward(good.clone().fill_(float("nan")), PROMPTS)
    with pytest.raises(ValueError, match="3 prompts for a batch of 2"):
        reward(good, PROMPTS + ["x"])
    with pytest.raises(TypeError, match="list of strings"):
        reward(good, "a red cat")
    with pytest.raises(ValueError, match="needs one prompt"):
        reward(good)
    with pytest.raises(ValueError, match="unknown reward 'pickscorez'"):
        build_reward("pickscorez", "somewhere")
    with pytest.raises(ValueError, match="projection_dim"):
        AestheticReward(clip, AestheticHead((8, 4, 1)))
