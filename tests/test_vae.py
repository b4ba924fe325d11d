"""Latent decoding for rewards (flowkern.models.vae) on tiny autoencoders built from config.

Reference for each kind: what the stock pipelines do before/after ``vae.decode`` (SD3/FLUX.1:
x / scaling_factor + shift_factor; FLUX.2: batch-norm denormalisation + 2x2 un-patchify; then diffusers'
``VaeImageProcessor.postprocess(..., "pt")``, i.e. (decode / 2 + 0.5).clamp(0, 1)).
"""

from __future__ import annotations

import pytest
import torch

from tests.models_tiny_backbones import VAE_KL_TINY, randn, tiny_vae

diffusers = pytest.importorskip("diffusers")

from flowkern.models.vae import LatentDecoder  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _postprocess(decoded: torch.Tensor) -> torch.Tensor:
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=2).postprocess(decoded, output_type="pt")


def _state(kind: str, seed: int = 0) -> torch.Tensor:
    return randn(2, 16, 4, 4, seed=seed) if kind == "flux2" else randn(2, 4, 8, 8, seed=seed)


@pytest.mark.parametrize("kind", ["kl", "tiny"])
def test_kl_and_tiny_match_pipeline_decode(kind):
    vae = tiny_vae(kind)
    decoder = LatentDecoder(vae)
    x = _state(kind)
    assert (decoder.scaling_factor, decoder.shift_factor) == (1.5, 0.1)  # from the config
    with torch.no_grad():
        ref = _postprocess(vae.decode(x / 1.5 + 0.1, return_dict=False)[0])
        out = decoder(x)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert ((out > 0) & (out < 1)).float().mean() > 0.2  # mostly unsaturated: the comparison means something
    over = LatentDecoder(vae, scaling_factor=2.0, shift_factor=0.0)  # e.g. a TAESD config without the factors
    with torch.no_grad():
        torch.testing.assert_close(over(x), _postprocess(vae.decode(x / 2.0, return_dict=False)[0]), rtol=0, atol=0)


def test_flux2_matches_pipeline_decode():
    from diffusers import Flux2Pipeline

    vae = tiny_vae("flux2")
    x = _state("flux2")
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    with torch.no_grad():
        z = Flux2Pipeline._unpatchify_latents(x * std + mean)
        ref = _postprocess(vae.decode(z, return_dict=False)[0])
        decoder = LatentDecoder(vae)
        torch.testing.assert_close(decoder.vae_latents(x), z, rtol=0, atol=1e-6)
        torch.testing.assert_close(decoder(x), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["kl", "tiny", "flux2"])
def test_gradients_reach_latents_and_clamp_modes(kind):
    vae = tiny_vae(kind)
    x = _state(kind).requires_grad_(True)
    g = randn(2, 3, 16, 16, seed=4)
    raw = LatentDecoder(vae, clamp="none")(x)
    (grad_raw,) = torch.autograd.grad((raw * g).sum(), x, retain_graph=True)
    hard = LatentDecoder(vae, clamp="hard")(x)
    (grad_hard,) = torch.autograd.grad((hard * g).sum(), x)
    st = LatentDecoder(vae, clamp="straight_through")(x)
    (grad_st,) = torch.autograd.grad((st * g).sum(), x)
    assert grad_raw.abs().sum() > 0 and torch.isfinite(grad_raw).all()
    torch.testing.assert_close(st, hard, rtol=0, atol=0)  # same values ...
    torch.testing.assert_close(grad_st, grad_raw, rtol=0, atol=0)  # ... identity gradient through the clamp
    saturated = (raw < 0) | (raw > 1)
    if saturated.any():
        (grad_masked,) = torch.autograd.grad((raw * g * ~saturated).sum(), x)
        torch.testing.assert_close(grad_hard, grad_masked, rtol=1e-5, atol=1e-7)
    # gradient check of the whole map in fp64 on one sample (the decoder is smooth without the clamp)
    decoder64 = LatentDecoder(tiny_vae(kind).double(), clamp="none")
    x64 = (randn(1, 16, 2, 2) if kind == "flux2" else randn(1, 4, 4, 4)).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: decoder64(z).sum(dim=(1, 2)), (x64,), eps=1e-6, atol=1e-5)


def test_gradient_checkpointing_same_gradients():
    decoder, x = LatentDecoder(tiny_vae("kl"), clamp="none"), _state("kl").requires_grad_(True)
    (plain,) = torch.autograd.grad(decoder(x).square().sum(), x)
    calls = []

    def policy(module, *args):
        calls.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    decoder.set_gradient_checkpointing(True, policy)
    (ckpt,) = torch.autograd.grad(decoder(x).square().sum(), x)
    decoder.set_gradient_checkpointing(False)
    assert "UpDecoderBlock2D" in calls
    torch.testing.assert_close(ckpt, plain, rtol=1e-6, atol=1e-7)
    calls.clear()
    decoder(x)
    assert not calls


def test_per_layer_checkpointing_same_gradients_lower_peak():
    """The default checkpointing wraps every decoder resnet/attention/upsampler: the same gradients, and an exact
    CPU peak below diffusers' per-up-block checkpointing, itself below none; switched off, the class forwards."""
    from diffusers import AutoencoderKL

    from flowkern.profiling import peak_memory

    config = {**VAE_KL_TINY, "block_out_channels": (8, 16), "layers_per_block": 2, "norm_num_groups": 4}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        decoder = LatentDecoder(AutoencoderKL(**config).eval(), clamp="none")
    x = randn(1, 4, 32, 32, seed=3)

    def grad():
        xx = x.clone().requires_grad_(True)
        return torch.autograd.grad(decoder(xx).square().sum(), xx)[0]

    block = lambda module, *args: torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
    plain, peak_plain = grad(), peak_memory(grad)
    decoder.set_gradient_checkpointing(True, block)
    per_block, peak_block = grad(), peak_memory(grad)
    decoder.set_gradient_checkpointing(True)
    assert decoder.gradient_checkpointing and not decoder.vae.decoder.gradient_checkpointing
    per_layer, peak_layer = grad(), peak_memory(grad)
    torch.testing.assert_close(per_block, plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_layer, plain, rtol=1e-6, atol=1e-7)
    assert peak_layer < 0.8 * peak_block and peak_block < 0.8 * peak_plain, (peak_layer, peak_block, peak_plain)
    decoder.set_gradient_checkpointing(False)
    assert not decoder.gradient_checkpointing
    assert not any("forward" in vars(m) for m in decoder.vae.modules())


def test_bf16_vae_fp32_latents():
    decoder = LatentDecoder(tiny_vae("kl", dtype=torch.bfloat16))
    x = _state("kl").requires_grad_(True)
    out = decoder(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.mean().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("kind", ["kl", "tiny", "flux2"])
def test_from_pretrained_local(tmp_path, kind):
    vae = tiny_vae(kind)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    loaded = LatentDecoder.from_pretrained(tmp_path / "pipe", local_files_only=True)  # kind from the config
    bare = LatentDecoder.from_pretrained(tmp_path / "pipe" / "vae", subfolder=None, local_files_only=True, kind=kind)
    assert loaded.kind == bare.kind == kind
    x = _state(kind)
    with torch.no_grad():
        ref = LatentDecoder(vae)(x)
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(bare(x), ref, rtol=0, atol=0)


def test_bad_inputs():
    decoder = LatentDecoder(tiny_vae("kl"))
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, H, W\]"):
        decoder(randn(2, 16, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        decoder(torch.zeros(2, 4, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="clamp"):
        LatentDecoder(tiny_vae("kl"), clamp="soft")
    with pytest.raises(TypeError, match="AutoencoderKL"):
        LatentDecoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="batch-norm"):
        LatentDecoder(tiny_vae("flux2"), scaling_factor=2.0)
    with pytest.raises(ValueError, match="FLUX.2 patchified latents"):
        LatentDecoder(tiny_vae("flux2"))(randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="scaling_factor"):
        LatentDecoder(tiny_vae("kl"), scaling_factor=0.0)
    with pytest.raises(ValueError, match="kind"):
        LatentDecoder.from_pretrained("unused", kind="vq")
    assert VAE_KL_TINY["latent_channels"] == 4
