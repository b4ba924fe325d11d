"""FLUX.1 adapter (flowkern.models.flux) on tiny models built from config.

Conventions under test (M3, diffusers 0.42.1 FluxPipeline): x is the unpacked latent [B, C, H, W], packed into
2x2-patch tokens with img_ids (0, row, col) and zero txt_ids; timestep = sigma = 1 - t (the transformer scales by
1000); v = -noise_pred; embedded guidance [B]; true CFG as a [2B] batch, uncond first. The LoRA file must load
into a *stock* FluxPipeline (docs/ecosystem.md (b)).
"""

from __future__ import annotations

import pytest
import torch

from tests.models_tiny_backbones import (
    check_base_velocity_restores_on_error,
    check_detach_uncond,
    check_gradient_checkpointing,
    randn,
    randomize_lora,
    tiny_flux_pipeline,
    tiny_flux_transformer,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flowkern.models.base import FlowModel  # noqa: E402
from flowkern.models.flux import (  # noqa: E402
    FluxConditioning,
    FluxFlowModel,
    image_position_ids,
    pack_latents,
    unpack_latents,
)
from flowkern.models.lora import LORA_WEIGHT_NAME, load_lora  # noqa: E402
from flowkern.sampling import sample_euler  # noqa: E402

B, C, L, D = 2, 4, 8, 32


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on the shared 2-core machine
    yield
    torch.set_num_threads(threads)


def _model(dtype=torch.float32, **overrides) -> FluxFlowModel:
    model = FluxFlowModel(tiny_flux_transformer(seed=0, dtype=dtype, **overrides))
    model.add_lora(4)
    randomize_lora(model.transformer)
    return model


def _cond(w: float | None = None, guidance: float | None = 3.5, dtype=torch.float32) -> FluxConditioning:
    text, pooled = randn(B, L, D, seed=1, dtype=dtype), randn(B, D, seed=2, dtype=dtype)
    if w is None:
        return FluxConditioning(text, pooled, guidance=guidance)
    neg, neg_pooled = randn(B, L, D, seed=3, dtype=dtype), randn(B, D, seed=4, dtype=dtype)
    return FluxConditioning(text, pooled, guidance, neg, neg_pooled, guidance_scale=w)


def _latents(h: int = 8, w: int = 8, seed: int = 5, dtype=torch.float32) -> torch.Tensor:
    return randn(B, C, h, w, seed=seed, dtype=dtype)


def _direct(transformer, x, sigma, text, pooled, guidance):
    """The stock pipeline's transformer call, built from FluxPipeline's own packing helpers."""
    from diffusers import FluxPipeline

    n, _, h, w = x.shape
    out = transformer(
        hidden_states=FluxPipeline._pack_latents(x, n, C, h, w),
        timestep=sigma,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=text,
        txt_ids=torch.zeros(text.shape[1], 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, "cpu", torch.float32),
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, h, w, vae_scale_factor=1)


# ---------------------------------------------------------------- packing and convention
def test_packing_matches_pipeline_and_round_trips():
    from diffusers import FluxPipeline

    x = randn(3, 4, 6, 10, seed=7)
    tokens = pack_latents(x)
    assert tokens.shape == (3, 15, 16)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 3, 4, 6, 10))
    assert torch.equal(unpack_latents(tokens, 6, 10), x)
    assert torch.equal(
        image_position_ids(3, 5, 3), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    )
    with pytest.raises(ValueError, match="divisible"):
        pack_latents(randn(1, 4, 5, 6))
    with pytest.raises(ValueError, match="do not pack"):
        unpack_latents(tokens, 6, 12)


def test_time_convention_timestep_is_sigma_and_guidance_embedded():
    model = _model()
    seen = []
    model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    with torch.no_grad():
        model.velocity(_latents(), torch.tensor([0.2, 0.9]), _cond())
    kw = seen[0]
    assert kw["timestep"].dtype == torch.float32
    torch.testing.assert_close(kw["timestep"], torch.tensor([0.8, 0.1]), rtol=0, atol=1e-7)  # sigma, not 1000 sigma
    torch.testing.assert_close(kw["guidance"], torch.tensor([3.5, 3.5]), rtol=0, atol=0)
    assert kw["hidden_states"].shape == (B, 16, 16) and kw["img_ids"].shape == (16, 3)
    assert torch.equal(kw["txt_ids"], torch.zeros(L, 3))


def test_protocol_and_lora_targets():
    model = _model()
    assert isinstance(model, FlowModel)
    names = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and len(names) == len(model.trainable_parameters())
    wrapped = {n.rsplit(".lora_", 1)[0] for n in names}
    assert "transformer_blocks.0.attn.to_out.0" in wrapped
    assert {f"single_transformer_blocks.0.attn.to_{k}" for k in "qkv"} <= wrapped
    assert len(wrapped) == 4 + 3  # double block q, k, v, out; single block q, k, v (it has no to_out)


# ---------------------------------------------------------------- velocity == direct call
@pytest.mark.parametrize("w", [None, 2.5])
def test_velocity_equals_direct_transformer_call(w):
    model, x, cond, t = _model(), _latents(), _cond(w), torch.tensor(0.3)
    plain = tiny_flux_transformer(seed=0)  # same base weights, no LoRA
    sigma, guidance = torch.full((B,), 0.7), torch.full((B,), 3.5)
    with torch.no_grad():
        v = model.velocity(x, t, cond)
        with model.base_velocity():
            v_base = model.velocity(x, t, cond)
        if w is None:
            ref = -_direct(model.transformer, x, sigma, cond.prompt_embeds, cond.pooled_prompt_embeds, guidance)
            ref_base = -_direct(plain, x, sigma, cond.prompt_embeds, cond.pooled_prompt_embeds, guidance)
        else:  # the pipeline's two calls: neg + w (cond - neg)
            refs = []
            for net in (model.transformer, plain):
                c = _direct(net, x, sigma, cond.prompt_embeds, cond.pooled_prompt_embeds, guidance)
                u = _direct(net, x, sigma, cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds, guidance)
                refs.append(-(u + w * (c - u)))
            ref, ref_base = refs
            v_u, v_c = model.velocity_pair(x, t, cond)
            torch.testing.assert_close(v_u + w * (v_c - v_u), v, rtol=0, atol=0)
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_base, ref_base, rtol=1e-5, atol=1e-6)
    assert (v - v_base).abs().max() > 1e-3  # the LoRA changes the velocity


def test_schnell_style_transformer_without_guidance():
    model = FluxFlowModel(tiny_flux_transformer(seed=0, guidance_embeds=False))
    x, cond = _latents(), _cond(guidance=None)
    with torch.no_grad():
        v = model.velocity(x, 0.4, cond)
        ref = -_direct(model.transformer, x, torch.full((B,), 0.6), cond.prompt_embeds, cond.pooled_prompt_embeds, None)
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no guidance embedding"):
        model.velocity(x, 0.4, _cond(guidance=3.5))


def test_base_velocity_restores_adapters_on_error():
    check_base_velocity_restores_on_error(_model(), _latents(), _cond(2.0))


def test_detach_uncond_parameter_path_only():
    w = 3.0
    cond = _cond(w)
    plain = FluxConditioning(cond.prompt_embeds, cond.pooled_prompt_embeds, guidance=3.5)
    check_detach_uncond(_model(), _latents(), torch.tensor(0.4), cond, plain, w)


def test_sampler_cfg_pair_matches_model_cfg():
    model, cond = _model(), _cond(3.0)
    x0, ts = _latents(), torch.linspace(0, 1, 4)
    a = sample_euler(model, x0, ts, cond).final
    b = sample_euler(model.velocity_pair, x0, ts, cond, guidance_scale=3.0).final
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_same_gradients():
    check_gradient_checkpointing(_model(), _latents(), _cond(2.0))


# ---------------------------------------------------------------- dtypes
def test_bf16_weights_fp32_lora():
    model = _model(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    v = model.velocity(_latents(), torch.tensor(0.5), _cond(2.0))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.trainable_parameters())
    assert all(p.grad is None for n, p in model.transformer.named_parameters() if "lora_" not in n)


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs():
    model, cond = _model(), _cond()
    with pytest.raises(TypeError, match="FluxConditioning"):
        model.velocity(_latents(), 0.5, (1, 2))
    with pytest.raises(ValueError, match=r"unpacked FLUX latents \[B, 4, H, W\]"):
        model.velocity(randn(B, 16, 8, 8), 0.5, cond)  # packed channel count
    with pytest.raises(ValueError, match="even"):
        model.velocity(_latents(7, 8), 0.5, cond)
    with pytest.raises(ValueError, match="batch"):
        model.velocity(_latents()[:1], 0.5, cond)
    with pytest.raises(ValueError, match="t must be"):
        model.velocity(_latents(), torch.zeros(3), cond)
    with pytest.raises(ValueError, match="guidance-distilled"):
        model.velocity(_latents(), 0.5, _cond(guidance=None))
    with pytest.raises(ValueError, match="joint_attention_dim=32"):
        model.velocity(_latents(), 0.5, FluxConditioning(randn(B, L, 16), randn(B, D), guidance=3.5))
    with pytest.raises(ValueError, match="negative"):
        FluxConditioning(randn(B, L, D), randn(B, D), guidance=3.5, guidance_scale=3.0)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        FluxConditioning(randn(B, L, D), randn(B + 1, D))
    with pytest.raises(ValueError, match="guidance"):
        FluxConditioning(randn(B, L, D), randn(B, D), guidance=torch.ones(B + 1))
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        FluxFlowModel(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- loading
def test_from_pretrained_local_round_trip(tmp_path):
    tiny_flux_transformer(seed=0).save_pretrained(tmp_path / "transformer")
    model = _model()
    model.save_lora(tmp_path / "lora")
    loaded = FluxFlowModel.from_pretrained(tmp_path, local_files_only=True, lora_rank=4)
    randomize_lora(loaded.transformer, seed=11)  # the file, not the init, must decide
    load_lora(loaded.transformer, tmp_path / "lora")
    bare = FluxFlowModel.from_pretrained(tmp_path / "transformer", subfolder=None, local_files_only=True)
    also = FluxFlowModel.from_pretrained(tmp_path, local_files_only=True, lora_rank=4, lora_path=tmp_path / "lora")
    x, cond = _latents(), _cond(2.0)
    with torch.no_grad():
        v = model.velocity(x, 0.3, cond)
        torch.testing.assert_close(loaded.velocity(x, 0.3, cond), v, rtol=0, atol=0)
        torch.testing.assert_close(also.velocity(x, 0.3, cond), v, rtol=0, atol=0)
        with model.base_velocity():
            torch.testing.assert_close(bare.velocity(x, 0.3, cond), model.velocity(x, 0.3, cond), rtol=0, atol=0)
    bf16 = FluxFlowModel.from_pretrained(tmp_path, local_files_only=True, torch_dtype=torch.bfloat16, lora_rank=2)
    assert bf16.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in bf16.trainable_parameters())


# ---------------------------------------------------------------- stock FluxPipeline loads flowkern's LoRA
def test_stock_flux_pipeline_loads_flowkern_lora(tmp_path):
    from diffusers import FluxPipeline

    pipe = tiny_flux_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "pipe")
    prompts, guidance, w, steps = ["a cat", "red bird"], 3.5, 2.0, 2
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=16)
        neg, neg_pooled, _ = pipe.encode_prompt(["", ""], None, max_sequence_length=16)
    cond = FluxConditioning(embeds, pooled, guidance, neg, neg_pooled, guidance_scale=w)

    # flowkern: the saved pipeline's transformer, LoRA (alpha != rank), two optimizer steps
    model = FluxFlowModel.from_pretrained(tmp_path / "pipe", local_files_only=True, lora_rank=4, lora_alpha=2.0)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        loss = model.velocity(torch.randn(B, C, 8, 8, generator=g), torch.rand(B, generator=g), cond).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    file = model.save_lora(tmp_path / "lora")
    assert file.endswith(LORA_WEIGHT_NAME)

    fresh = FluxPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    base_pipe = FluxPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    fresh.load_lora_weights(tmp_path / "lora")
    # the stock transformer call with the LoRA equals flowkern's velocity (and differs from the base)
    x, t = _latents(seed=8), torch.tensor([0.25, 0.6])
    with torch.no_grad():
        ours = model.velocity(x, t, FluxConditioning(embeds, pooled, guidance))
        theirs = -_direct(fresh.transformer, x, 1 - t, embeds, pooled, torch.full((B,), guidance))
        theirs_base = -_direct(base_pipe.transformer, x, 1 - t, embeds, pooled, torch.full((B,), guidance))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (theirs - theirs_base).abs().max() > 1e-3

    # the whole stock sampling loop (shifted sigmas, true CFG + embedded guidance) vs flowkern's sampler
    x0 = _latents(seed=9)

    def stock(p) -> torch.Tensor:
        out = p(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
            negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=w, guidance_scale=guidance,
            num_inference_steps=steps, height=16, width=16, latents=pack_latents(x0), output_type="latent",
        ).images  # fmt: skip
        return unpack_latents(out, 8, 8)

    theirs, theirs_base = stock(fresh), stock(base_pipe)
    ts = 1.0 - fresh.scheduler.sigmas.to(torch.float64)  # t = 1 - sigma (M3) on the pipeline's own grid
    with torch.no_grad():
        ours = sample_euler(model, x0, ts, cond).final
        with model.base_velocity():
            ours_base = sample_euler(model, x0, ts, cond).final
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_base, theirs_base, rtol=1e-5, atol=1e-5)
    assert (theirs - theirs_base).abs().max() > 1e-3
