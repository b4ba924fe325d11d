"""FLUX.2 adapter (flowkern.models.flux2) on tiny models built from config.

Conventions under test (M3, diffusers 0.42.1 Flux2Pipeline / Flux2KleinPipeline): x is the pipeline's latent
[B, C, h, w] (patchified + batch-normalised VAE latent), one token per position with img_ids (0, row, col, 0)
and txt_ids (0, 0, 0, l); timestep = sigma = 1 - t; v = -noise_pred; embedded guidance for FLUX.2-dev, none for
Klein; true CFG as a [2B] batch. LoRA files load into the stock FLUX.2 pipelines.
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
    tiny_flux2_transformer,
    tiny_vae,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flowkern.models.base import FlowModel  # noqa: E402
from flowkern.models.flux import image_position_ids, pack_latents, unpack_latents  # noqa: E402
from flowkern.models.flux2 import Flux2Conditioning, Flux2FlowModel, text_position_ids  # noqa: E402
from flowkern.models.lora import load_lora  # noqa: E402
from flowkern.models.vae import LatentDecoder  # noqa: E402
from flowkern.sampling import sample_euler  # noqa: E402

B, C, L, D = 2, 16, 6, 32


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(dtype=torch.float32, **overrides) -> Flux2FlowModel:
    model = Flux2FlowModel(tiny_flux2_transformer(seed=0, dtype=dtype, **overrides))
    model.add_lora(4)
    randomize_lora(model.transformer)
    return model


def _cond(w: float | None = None, guidance: float | None = 4.0) -> Flux2Conditioning:
    text = randn(B, L, D, seed=1)
    if w is None:
        return Flux2Conditioning(text, guidance=guidance)
    return Flux2Conditioning(text, guidance=guidance, negative_prompt_embeds=randn(B, L, D, seed=3), guidance_scale=w)


def _latents(h: int = 4, w: int = 4, seed: int = 5) -> torch.Tensor:
    return randn(B, C, h, w, seed=seed)


def _direct(transformer, x, sigma, text, guidance):
    """The stock pipeline's transformer call with Flux2Pipeline's own packing and id helpers."""
    from diffusers import Flux2Pipeline

    ids = Flux2Pipeline._prepare_latent_ids(x)
    out = transformer(
        hidden_states=Flux2Pipeline._pack_latents(x),
        encoder_hidden_states=text,
        timestep=sigma,
        guidance=guidance,
        img_ids=ids,
        txt_ids=Flux2Pipeline._prepare_text_ids(text),
        return_dict=False,
    )[0]
    return Flux2Pipeline._unpack_latents_with_ids(out, ids)


def test_packing_and_ids_match_pipeline():
    from diffusers import Flux2Pipeline

    x = randn(2, 8, 3, 5, seed=7)
    assert torch.equal(pack_latents(x, patch_size=1), Flux2Pipeline._pack_latents(x))
    assert torch.equal(image_position_ids(3, 5, 4), Flux2Pipeline._prepare_latent_ids(x)[0].float())
    assert torch.equal(text_position_ids(L), Flux2Pipeline._prepare_text_ids(randn(1, L, 4))[0].float())
    # FLUX.2's VAE patchify + packing is FLUX.1's 2x2 packing (shared helper)
    z = randn(2, 4, 6, 8, seed=8)
    patchified = Flux2Pipeline._patchify_latents(z)
    assert torch.equal(pack_latents(patchified, patch_size=1), pack_latents(z, patch_size=2))
    assert torch.equal(
        unpack_latents(pack_latents(patchified, 1), 6, 8, 2), Flux2Pipeline._unpatchify_latents(patchified)
    )


def test_time_convention_timestep_is_sigma():
    model = _model()
    seen = []
    model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    with torch.no_grad():
        model.velocity(_latents(), torch.tensor([0.2, 0.9]), _cond())
    torch.testing.assert_close(seen[0]["timestep"], torch.tensor([0.8, 0.1]), rtol=0, atol=1e-7)
    torch.testing.assert_close(seen[0]["guidance"], torch.tensor([4.0, 4.0]), rtol=0, atol=0)
    assert seen[0]["hidden_states"].shape == (B, 16, C) and seen[0]["img_ids"].shape == (16, 4)


def test_protocol_and_lora_targets():
    model = _model()
    assert isinstance(model, FlowModel)
    wrapped = {n.rsplit(".lora_", 1)[0] for n, p in model.transformer.named_parameters() if p.requires_grad}
    assert wrapped == {
        *(f"transformer_blocks.0.attn.to_{k}" for k in ("q", "k", "v", "out.0")),
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",  # the single blocks' fused projection
    }


@pytest.mark.parametrize("w", [None, 2.5])
def test_velocity_equals_direct_transformer_call(w):
    model, x, cond, t = _model(), _latents(), _cond(w), torch.tensor(0.3)
    plain = tiny_flux2_transformer(seed=0)
    sigma, guidance = torch.full((B,), 0.7), torch.full((B,), 4.0)
    with torch.no_grad():
        v = model.velocity(x, t, cond)
        with model.base_velocity():
            v_base = model.velocity(x, t, cond)
        refs = []
        for net in (model.transformer, plain):
            c = _direct(net, x, sigma, cond.prompt_embeds, guidance)
            if w is None:
                refs.append(-c)
            else:
                u = _direct(net, x, sigma, cond.negative_prompt_embeds, guidance)
                refs.append(-(u + w * (c - u)))
    torch.testing.assert_close(v, refs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_base, refs[1], rtol=1e-5, atol=1e-6)
    assert (v - v_base).abs().max() > 1e-3


def test_base_velocity_restores_adapters_on_error():
    check_base_velocity_restores_on_error(_model(), _latents(), _cond(2.0))


def test_detach_uncond_parameter_path_only():
    cond = _cond(3.0)
    check_detach_uncond(_model(), _latents(), torch.tensor(0.4), cond, _cond(None), 3.0)


def test_gradient_checkpointing_same_gradients():
    check_gradient_checkpointing(_model(), _latents(), _cond(2.0))


def test_bf16_weights_fp32_lora():
    model = _model(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in model.trainable_parameters())
    v = model.velocity(_latents(), torch.tensor(0.5), _cond(2.0))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.trainable_parameters())


def test_bad_inputs():
    model = _model()
    with pytest.raises(TypeError, match="Flux2Conditioning"):
        model.velocity(_latents(), 0.5, randn(B, L, D))
    with pytest.raises(ValueError, match=r"FLUX.2 latents \[B, 16, h, w\]"):
        model.velocity(randn(B, 4, 8, 8), 0.5, _cond())
    with pytest.raises(ValueError, match="batch"):
        model.velocity(randn(B + 1, C, 4, 4), 0.5, _cond())
    with pytest.raises(ValueError, match="embeds guidance"):
        model.velocity(_latents(), 0.5, _cond(guidance=None))
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        Flux2Conditioning(randn(B, L, D), guidance=4.0, guidance_scale=2.0)
    with pytest.raises(ValueError, match="prompt_embeds"):
        Flux2Conditioning(randn(B, D))
    klein = Flux2FlowModel(tiny_flux2_transformer(seed=0, guidance_embeds=False))
    with pytest.raises(ValueError, match="Klein"):
        klein.velocity(_latents(), 0.5, _cond())


def test_from_pretrained_local_round_trip(tmp_path):
    tiny_flux2_transformer(seed=0).save_pretrained(tmp_path / "transformer")
    model = _model()
    model.save_lora(tmp_path / "lora")
    loaded = Flux2FlowModel.from_pretrained(tmp_path, local_files_only=True, lora_rank=4)
    randomize_lora(loaded.transformer, seed=11)
    load_lora(loaded.transformer, tmp_path / "lora")
    x, cond = _latents(), _cond(2.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, 0.3, cond), model.velocity(x, 0.3, cond), rtol=0, atol=0)


@pytest.mark.parametrize("pipeline", ["Flux2Pipeline", "Flux2KleinPipeline"])
def test_stock_flux2_pipelines_load_flowkern_lora(tmp_path, pipeline):
    """FLUX.2-dev (embedded guidance) and Klein (true CFG): the stock sampling loop + VAE decode with flowkern's
    LoRA file equals flowkern's sampler + LatentDecoder (batch-norm denormalisation, un-patchify, decode)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    dev = pipeline == "Flux2Pipeline"
    model = Flux2FlowModel(tiny_flux2_transformer(seed=0, guidance_embeds=dev))
    model.add_lora(4, 2.0)
    randomize_lora(model.transformer)
    model.save_lora(tmp_path / "lora")
    vae = tiny_vae("flux2", seed=0)

    def stock(lora: bool) -> torch.Tensor:
        transformer = tiny_flux2_transformer(seed=0, guidance_embeds=dev)
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        pipe = getattr(diffusers, pipeline)(scheduler, vae, None, None, transformer)
        if lora:
            pipe.load_lora_weights(tmp_path / "lora")
        call = dict(prompt_embeds=cond.prompt_embeds, num_inference_steps=2, height=16, width=16, latents=x0.clone(),
                    output_type="pt")  # fmt: skip
        if dev:
            call["guidance_scale"] = 4.0
        else:
            call.update(negative_prompt_embeds=cond.negative_prompt_embeds, guidance_scale=cond.guidance_scale)
        out = pipe(**call).images
        stock.ts = 1.0 - pipe.scheduler.sigmas.to(torch.float64)
        return out

    cond = _cond(None, 4.0) if dev else _cond(2.0, None)
    x0 = _latents(seed=9)
    theirs, theirs_base = stock(True), stock(False)
    decoder = LatentDecoder(vae)
    with torch.no_grad():
        ours = decoder(sample_euler(model, x0, stock.ts, cond).final)
        with model.base_velocity():
            ours_base = decoder(sample_euler(model, x0, stock.ts, cond).final)
    assert theirs.shape == (B, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_base, theirs_base, rtol=1e-5, atol=1e-5)
    assert (theirs - theirs_base).abs().max() > 1e-3
