"""SD3 adapter (flowkern.models.sd3) and LoRA I/O (flowkern.models.lora) on tiny models built from config.

Conventions under test (M3): timestep = 1000 (1 - t), v = -noise_pred; CFG (M5) over a [2B] batch, uncond
first. The LoRA file must load into a *stock* StableDiffusion3Pipeline (docs/ecosystem.md (b)).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.models_tiny import SD3_TINY, sd3_conditioning, tiny_sd3_transformer
from tests.models_tiny_backbones import check_detach_uncond

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flowkern.models.base import FlowModel  # noqa: E402
from flowkern.models.lora import LORA_WEIGHT_NAME, add_lora, load_lora  # noqa: E402
from flowkern.models.sd3 import SD3Conditioning, SD3FlowModel, sd3_timestep  # noqa: E402
from flowkern.sampling import sample_euler  # noqa: E402

B = 2


def _randomize_lora(transformer, seed: int = 3, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def _model(rank: int = 4, alpha: float | None = None, dtype=torch.float32) -> SD3FlowModel:
    model = SD3FlowModel(tiny_sd3_transformer(seed=0, dtype=dtype))
    model.add_lora(rank, alpha)
    _randomize_lora(model.transformer)
    return model


def _cond(w: float | None = None, dtype=torch.float32) -> SD3Conditioning:
    text, pooled = sd3_conditioning(B, seed=1, dtype=dtype)
    if w is None:
        return SD3Conditioning(text, pooled)
    neg_text, neg_pooled = sd3_conditioning(B, seed=2, dtype=dtype)
    return SD3Conditioning(text, pooled, neg_text, neg_pooled, guidance_scale=w)


def _latents(seed: int = 4, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, SD3_TINY["in_channels"], 16, 16, generator=g).to(dtype)


def _direct(transformer, x, timestep, text, pooled):
    return transformer(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep).sample


# ---------------------------------------------------------------- convention
def test_time_convention_timestep_is_1000_sigma():
    t = torch.tensor([0.0, 0.25, 0.9, 1.0])
    torch.testing.assert_close(sd3_timestep(t, 4), torch.tensor([1000.0, 750.0, 100.0, 0.0]), rtol=0, atol=1e-4)
    assert torch.equal(sd3_timestep(torch.tensor(0.3), 3), torch.full((3,), 700.0))
    with pytest.raises(ValueError, match="t must be"):
        sd3_timestep(torch.zeros(3), 2)

    model = _model()
    seen = []
    model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    x, cond = _latents(), _cond()
    with torch.no_grad():
        model.velocity(x, torch.tensor([0.2, 0.6]), cond)
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], torch.tensor([800.0, 400.0]), rtol=0, atol=1e-4)


def test_protocol_and_trainable_parameters():
    model = _model()
    assert isinstance(model, FlowModel)
    params = model.trainable_parameters()
    names = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert params and len(params) == len(names) and all("lora_" in n for n in names)
    assert len(params) == 2 * 4 * 2  # 2 blocks x (to_q, to_k, to_v, to_out.0) x (lora_A, lora_B)


# ---------------------------------------------------------------- velocity == direct call
@pytest.mark.parametrize("w", [None, 4.5])
def test_velocity_equals_direct_transformer_call(w):
    model = _model()
    x, cond, t = _latents(), _cond(w), torch.tensor(0.3)
    timestep = torch.full((B,), 700.0)
    plain = tiny_sd3_transformer(seed=0)  # same base weights, no LoRA
    with torch.no_grad():
        v = model.velocity(x, t, cond)
        with model.base_velocity():
            v_base = model.velocity(x, t, cond)
        v_lora_again = model.velocity(x, t, cond)
        if w is None:
            ref = -_direct(model.transformer, x, timestep, cond.prompt_embeds, cond.pooled_prompt_embeds)
            ref_base = -_direct(plain, x, timestep, cond.prompt_embeds, cond.pooled_prompt_embeds)
        else:
            text2, pooled2 = cond.cfg_embeds()
            noise = _direct(model.transformer, torch.cat([x, x]), timestep.repeat(2), text2, pooled2)
            u, c = noise.chunk(2)
            ref = -(u + w * (c - u))
            u, c = _direct(plain, torch.cat([x, x]), timestep.repeat(2), text2, pooled2).chunk(2)
            ref_base = -(u + w * (c - u))
            v_u, v_c = model.velocity_pair(x, t, cond)
            torch.testing.assert_close(v_u + w * (v_c - v_u), v, rtol=0, atol=0)
    torch.testing.assert_close(v, ref, rtol=0, atol=0)
    torch.testing.assert_close(v_base, ref_base, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_lora_again, v, rtol=0, atol=0)  # adapters back on after the context
    assert (v - v_base).abs().max() > 1e-3  # the LoRA changes the velocity


def test_base_velocity_restores_adapters_on_error():
    model, x, cond = _model(), _latents(), _cond()
    with torch.no_grad():
        before = model.velocity(x, 0.5, cond)
        with pytest.raises(RuntimeError, match="boom"), model.base_velocity():
            raise RuntimeError("boom")
        torch.testing.assert_close(model.velocity(x, 0.5, cond), before, rtol=0, atol=0)


def test_sampler_cfg_pair_matches_model_cfg():
    model, cond = _model(), _cond(3.0)
    x0, ts = _latents(), torch.linspace(0, 1, 4)
    a = sample_euler(model, x0, ts, cond).final
    b = sample_euler(model.velocity_pair, x0, ts, cond, guidance_scale=3.0).final
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- detach_uncond (M5)
def test_detach_uncond_parameter_path_only():
    """(M5): parameter path w d v_c / d theta only, state path (1 - w) J_u + w J_c, no graph for the detached half."""
    w = 3.0
    model, cond = _model(), _cond(w)
    cond_only = SD3Conditioning(cond.prompt_embeds, cond.pooled_prompt_embeds)
    check_detach_uncond(model, _latents(), torch.tensor(0.4), cond, cond_only, w)


# ---------------------------------------------------------------- dtypes, checkpointing
def test_bf16_weights_fp32_lora():
    model = _model(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    x, cond = _latents(), _cond(2.0)
    v = model.velocity(x, torch.tensor(0.5), cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.trainable_parameters())


def test_gradient_checkpointing_same_gradients():
    model, x, cond = _model(), _latents(), _cond(2.0)
    params = model.trainable_parameters()

    def run():
        v = model.velocity(x, torch.tensor(0.5), cond)
        return torch.autograd.grad(v.square().mean(), params)

    plain = run()
    calls = []

    def policy(module, *args):
        calls.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    model.set_gradient_checkpointing(True, policy)
    ckpt = run()
    model.set_gradient_checkpointing(False)
    assert calls and not model.transformer.gradient_checkpointing
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bad_inputs():
    model = _model()
    with pytest.raises(TypeError, match="SD3Conditioning"):
        model.velocity(_latents(), 0.5, (1, 2))
    with pytest.raises(ValueError, match="batch"):
        model.velocity(_latents()[:1], 0.5, _cond())
    text, pooled = sd3_conditioning(B)
    with pytest.raises(ValueError, match="negative"):
        SD3Conditioning(text, pooled, guidance_scale=3.0)
    with pytest.raises(ValueError, match="already has a LoRA"):
        model.add_lora(4)
    with pytest.raises(ValueError, match="rank"):
        add_lora(tiny_sd3_transformer(), 0)


# ---------------------------------------------------------------- loading
def test_from_pretrained_local_round_trip(tmp_path):
    base = tiny_sd3_transformer(seed=0)
    base.save_pretrained(tmp_path / "transformer")
    model = _model(rank=4, alpha=8.0)
    file = model.save_lora(tmp_path / "lora")
    assert file.endswith(LORA_WEIGHT_NAME)
    loaded = SD3FlowModel.from_pretrained(tmp_path, local_files_only=True, lora_rank=4, lora_alpha=8.0)
    _randomize_lora(loaded.transformer, seed=11)  # make sure the file, not the init, decides
    load_lora(loaded.transformer, tmp_path / "lora")
    bare = SD3FlowModel.from_pretrained(tmp_path / "transformer", subfolder=None, local_files_only=True)
    x, cond = _latents(), _cond(2.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, 0.3, cond), model.velocity(x, 0.3, cond), rtol=0, atol=0)
        with model.base_velocity():
            torch.testing.assert_close(bare.velocity(x, 0.3, cond), model.velocity(x, 0.3, cond), rtol=0, atol=0)
    also = SD3FlowModel.from_pretrained(
        tmp_path, local_files_only=True, lora_rank=4, lora_alpha=8.0, lora_path=tmp_path / "lora"
    )
    with torch.no_grad():
        torch.testing.assert_close(also.velocity(x, 0.3, cond), model.velocity(x, 0.3, cond), rtol=0, atol=0)
    assert all(p.requires_grad for p in also.trainable_parameters())
    bf16 = SD3FlowModel.from_pretrained(tmp_path, local_files_only=True, torch_dtype=torch.bfloat16, lora_rank=2)
    assert bf16.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in bf16.trainable_parameters())
    with pytest.raises(ValueError, match="does not match"):
        load_lora(bf16.transformer, tmp_path / "lora")  # rank 2 adapter vs a rank 4 file


# ---------------------------------------------------------------- stock pipeline loads flowkern's LoRA
def _tiny_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    specials = dict(unk_token="<|endoftext|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>")
    tokenizers = [
        CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=77, **specials)
        for _ in range(2)
    ]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in letters] + [(c, -2.0) for c in letters]
    t5_tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoders = []
        for _ in range(2):
            cfg = CLIPTextConfig(
                vocab_size=len(tokenizers[0]),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                projection_dim=16,
                max_position_embeddings=77,
                eos_token_id=tokenizers[0].eos_token_id,
                bos_token_id=tokenizers[0].bos_token_id,
                pad_token_id=tokenizers[0].pad_token_id,
            )
            encoders.append(CLIPTextModelWithProjection(cfg).eval())
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
            )
        ).eval()
        vae = AutoencoderKL(
            block_out_channels=(4,),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed=0),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizers[1],
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


def test_stock_pipeline_loads_flowkern_lora(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = _tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    prompts, w, steps = ["a cat", "red bird"], 3.0, 2
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts, None, None, negative_prompt="", do_classifier_free_guidance=True, max_sequence_length=16
        )
    cond = SD3Conditioning(embeds, pooled, neg, neg_pooled, guidance_scale=w)

    # flowkern: load the saved pipeline's transformer, attach LoRA (alpha != rank), two optimizer steps
    model = SD3FlowModel.from_pretrained(tmp_path / "pipe", local_files_only=True, lora_rank=4, lora_alpha=2.0)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        x = torch.randn(2, 4, 32, 32, generator=g)
        loss = model.velocity(x, torch.rand(2, generator=g), cond, detach_uncond=True).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_lora(tmp_path / "lora")
    meta = __import__("safetensors").safe_open(str(tmp_path / "lora" / LORA_WEIGHT_NAME), "pt").metadata()
    # the LoraConfig (alpha) travels with the file, beside safetensors' own {"format": "pt"}
    configs = [json.loads(v) for v in meta.values() if v.lstrip().startswith("{")]
    configs = [{k.removeprefix("transformer."): v for k, v in c.items()} for c in configs]
    assert any(c.get("lora_alpha") == 2.0 and c.get("r") == 4 for c in configs), meta

    # flowkern's own sampler on the scheduler's grid (t = 1 - sigma, M3/M4)
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    ts = 1.0 - sched.sigmas.to(torch.float64)
    x0 = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = sample_euler(model, x0, ts, cond).final
        with model.base_velocity():
            ours_base = sample_euler(model, x0, ts, cond).final

    def stock(lora: bool) -> torch.Tensor:
        fresh = StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
        if lora:
            fresh.load_lora_weights(tmp_path / "lora")
        return fresh(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=neg,
            negative_pooled_prompt_embeds=neg_pooled,
            guidance_scale=w,
            num_inference_steps=steps,
            latents=x0.clone(),
            output_type="latent",
        ).images

    theirs, theirs_base = stock(True), stock(False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_base, theirs_base, rtol=1e-5, atol=1e-5)
    assert (theirs - theirs_base).abs().max() > 1e-3  # the LoRA changed the stock pipeline's output


def test_time_derivative_through_adapter():
    """d v/d t exists through the adapter (M3: d/dt = -1000 d/d timestep) and matches a finite difference."""
    model = SD3FlowModel(tiny_sd3_transformer(seed=0).double())
    x, cond = _latents(dtype=torch.float64), _cond(dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (dt,) = torch.autograd.grad((model.velocity(x, t, cond) * g).sum(), t)
    eps = 1e-4
    with torch.no_grad():
        fd = ((model.velocity(x, 0.4 + eps, cond) - model.velocity(x, 0.4 - eps, cond)) * g).sum() / (2 * eps)
    torch.testing.assert_close(dt, fd, rtol=2e-3, atol=1e-3)
