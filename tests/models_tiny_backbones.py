"""Tiny FLUX.1 / FLUX.2 / DiT (SiT) transformers, autoencoders, text encoders and tokenizers for CPU tests.

Everything is built from a config with random weights (docs/ecosystem.md (a), (f)): no downloads. Modules are
returned in eval mode (train mode enables dropout: T5, DiT's label dropout) and frozen.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

FLUX_TINY = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels x 2x2 packing
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,  # FLUX.1-dev style (embedded guidance)
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
)

FLUX2_TINY = dict(
    patch_size=1,
    in_channels=16,  # 4 VAE latent channels x 2x2 patchify
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim
    guidance_embeds=True,  # FLUX.2-dev style; Klein has False
)

DIT_TINY = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,  # learn_sigma: the adapter keeps the first 4 channels
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,  # 10 classes; label 10 is the null class
)

VAE_KL_TINY = dict(
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(4, 4),  # 2x upsampling: 8x8 latents -> 16x16 images
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=1,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=1.5,
    shift_factor=0.1,
)

VAE_TINY_TAESD = dict(
    encoder_block_out_channels=(8, 8),
    decoder_block_out_channels=(8, 8),
    num_encoder_blocks=(1, 1),
    num_decoder_blocks=(1, 1),
    latent_channels=4,
    scaling_factor=1.5,
    shift_factor=0.1,
)

VAE_FLUX2_TINY = dict(
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(4, 4),
    layers_per_block=1,
    latent_channels=4,  # patchified: 16 channels = FLUX2_TINY in_channels
    norm_num_groups=1,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _build(cls, config: dict, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**config).eval()
    model.requires_grad_(False)
    if dtype != torch.float32:
        logger = logging.getLogger("diffusers.models.modeling_utils")  # .to(dtype) warns about fp32 modules
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            model = model.to(dtype=dtype)
        finally:
            logger.setLevel(level)
    return model


def tiny_flux_transformer(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return _build(FluxTransformer2DModel, {**FLUX_TINY, **overrides}, seed, dtype)


def tiny_flux2_transformer(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    from diffusers import Flux2Transformer2DModel

    return _build(Flux2Transformer2DModel, {**FLUX2_TINY, **overrides}, seed, dtype)


def tiny_dit_transformer(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return _build(DiTTransformer2DModel, {**DIT_TINY, **overrides}, seed, dtype)


def tiny_vae(kind: str = "kl", seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """'kl' AutoencoderKL, 'tiny' AutoencoderTiny (TAESD), 'flux2' AutoencoderKLFlux2 with random batch-norm stats."""
    import diffusers

    cls, config = {
        "kl": (diffusers.AutoencoderKL, VAE_KL_TINY),
        "tiny": (diffusers.AutoencoderTiny, VAE_TINY_TAESD),
        "flux2": (diffusers.AutoencoderKLFlux2, VAE_FLUX2_TINY),
    }[kind]
    vae = _build(cls, config, seed, dtype)
    if kind == "flux2":  # non-trivial normalisation statistics, so the test sees them applied
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=g))
            vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    return vae


def randomize_lora(transformer: nn.Module, seed: int = 3, scale: float = 0.2) -> None:
    """Random values in every LoRA parameter (lora_B starts at zero), so an adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------- text side
def clip_tokenizer(model_max_length: int = 77):
    """A letter-level CLIPTokenizer built in memory (the wheels ship no vocab files)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    end = "<|endoftext|>"
    return CLIPTokenizer(
        vocab=vocab, merges=[], unk_token=end, bos_token="<|startoftext|>", eos_token=end, pad_token=end,
        model_max_length=model_max_length,
    )  # fmt: skip


def t5_tokenizer(model_max_length: int = 16):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in LETTERS] + [(c, -2.0) for c in LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_clip_model(tokenizer, seed: int = 0, image_size: int = 32) -> nn.Module:
    """A tiny `CLIPModel` (text + vision towers) for CLIPScore rewards."""
    from transformers import CLIPConfig, CLIPModel

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(tokenizer), max_position_embeddings=77, **ids),
        vision_config=dict(image_size=image_size, patch_size=4, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16,
    )  # fmt: skip
    return _build(CLIPModel, {"config": cfg}, seed)


def tiny_flux_text_encoders(clip_tok, t5_tok, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(CLIPTextModel with hidden 32 = FLUX_TINY pooled_projection_dim, T5EncoderModel with d_model 32)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_cfg = CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, eos_token_id=clip_tok.eos_token_id, bos_token_id=clip_tok.bos_token_id,
        pad_token_id=clip_tok.pad_token_id,
    )  # fmt: skip
    t5_cfg = T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8)  # fmt: skip
    return _build(CLIPTextModel, {"config": clip_cfg}, seed), _build(T5EncoderModel, {"config": t5_cfg}, seed + 1)


def tiny_flux_pipeline(seed: int = 0):
    """A stock `FluxPipeline` from tiny components (FLUX_TINY transformer, CLIP + T5 encoders, KL VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip_text, t5 = tiny_flux_text_encoders(clip_tok, t5_tok, seed)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=tiny_vae("kl", seed),
        text_encoder=clip_text,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=tiny_flux_transformer(seed),
    )


# ---------------------------------------------------------------------- checks shared by the adapter tests
def check_base_velocity_restores_on_error(model, x: torch.Tensor, cond) -> None:
    """``base_velocity()`` turns the LoRA off and back on, also when the body raises."""
    import pytest

    with torch.no_grad():
        before = model.velocity(x, 0.5, cond)
        with model.base_velocity():
            base = model.velocity(x, 0.5, cond)
        with pytest.raises(RuntimeError, match="boom"), model.base_velocity():
            torch.testing.assert_close(model.velocity(x, 0.5, cond), base, rtol=0, atol=0)
            raise RuntimeError("boom")
        after = model.velocity(x, 0.5, cond)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert (before - base).abs().max() > 1e-3  # the LoRA was on before and after, off inside
    assert model.trainable_parameters() and all(p.requires_grad for p in model.trainable_parameters())


def check_detach_uncond(model, x: torch.Tensor, t: torch.Tensor, cond, cond_only, w: float) -> None:
    """(M5) detach_uncond: d v/d theta = w d v_c/d theta; d v/d x keeps (1 - w) J_u + w J_c.

    ``cond`` has CFG with weight ``w``; ``cond_only`` is its conditional branch without CFG.
    """
    params = model.trainable_parameters()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype)

    def grads(detach: bool, x_grad: bool):
        xx = x.clone().requires_grad_(x_grad)
        v = model.velocity(xx, t, cond, detach_uncond=detach)
        out = torch.autograd.grad((v * g).sum(), params + ([xx] if x_grad else []), allow_unused=True)
        return v.detach(), out

    v_full, full = grads(False, True)
    v_det, det = grads(True, True)  # state path needed: v_u recomputed with frozen parameters
    v_fast, fast = grads(True, False)  # no state path: v_u under no_grad, v_c with grad (two B-batches)
    torch.testing.assert_close(v_det, v_full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_fast, v_full, rtol=1e-6, atol=1e-6)  # B- vs 2B-batch matmuls: rounding only
    # no graph is kept for the detached unconditional half: autograd saves what the conditional branch alone saves
    saved_fast = saved_bytes(lambda: model.velocity(x, t, cond, detach_uncond=True))
    saved_cond = saved_bytes(lambda: model.velocity(x, t, cond_only))
    saved_full = saved_bytes(lambda: model.velocity(x, t, cond))  # the [2B] batch
    assert 0 < saved_fast <= saved_cond < saved_full, (saved_fast, saved_cond, saved_full)
    v_c = model.velocity(x, t, cond_only)
    expected = torch.autograd.grad((w * v_c * g).sum(), params)
    for a, b, c in zip(det[: len(params)], fast, expected, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(det[-1], full[-1], rtol=1e-5, atol=1e-6)  # the state gradient is untouched
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(full[: len(params)], expected, strict=True))


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs (its graph's memory)."""
    storages = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def check_gradient_checkpointing(model, x: torch.Tensor, cond) -> None:
    """Per-block checkpointing through the adapter's hook gives the same LoRA gradients, and is switched off again."""
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
    checkpointed = run()
    model.set_gradient_checkpointing(False)
    assert calls and not model.transformer.gradient_checkpointing
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def qwen_tokenizer(model_max_length: int = 512):
    """A letter-level Qwen2Tokenizer built in memory with a minimal chat template (Flux2KleinPipeline applies one)."""
    from transformers import Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for c in LETTERS + " ":
        vocab[c] = len(vocab)
    end = "<|endoftext|>"
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=end, pad_token=end, eos_token="<|im_end|>", model_max_length=model_max_length
    )
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    return tokenizer


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False):
    """A stock `Flux2KleinPipeline` from tiny components: a 27-layer Qwen3 with hidden size 16 (Klein stacks the hidden
    states of layers 9, 18, 27: joint_attention_dim 48), the FLUX2_TINY transformer without embedded guidance, and
    the tiny AutoencoderKLFlux2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
    )  # fmt: skip
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=tiny_vae("flux2", seed),
        text_encoder=_build(Qwen3ForCausalLM, {"config": config}, seed),
        tokenizer=tokenizer,
        transformer=tiny_flux2_transformer(seed, joint_attention_dim=48, guidance_embeds=False),
        is_distilled=is_distilled,
    )


def mistral_tokenizer(model_max_length: int = 512):
    """A letter-level fast tokenizer with Pixtral's image tokens and a chat template over Mistral 3's message parts
    (``[{"type": "text", "text": ...}]``), built in memory. FLUX.2-dev ships a ``PixtralProcessor``, which
    transformers 5.25 builds only with torchvision; ``Flux2Pipeline`` calls just its ``apply_chat_template``, which a
    tokenizer has with the same arguments."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "[IMG]": 4, "[IMG_BREAK]": 5, "[IMG_END]": 6}
    for c in LETTERS + " ":
        vocab[c] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=model_max_length,
    )  # fmt: skip
    tokenizer.chat_template = (
        "<s>{% for m in messages %}{% for part in m['content'] %}{% if part['type'] == 'text' %}"
        "{{ part['text'] }}{% endif %}{% endfor %}</s>{% endfor %}"
    )
    return tokenizer


def tiny_flux2_dev_pipeline(seed: int = 0):
    """A stock `Flux2Pipeline` (FLUX.2-dev) from tiny components: a 30-layer Mistral 3 (text hidden size 16; the
    pipeline stacks the hidden states of layers 10, 20, 30: joint_attention_dim 48) with a one-layer Pixtral vision
    tower, the FLUX2_TINY transformer with embedded guidance, the tiny AutoencoderKLFlux2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    tokenizer = mistral_tokenizer()
    text = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=30, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
    )  # fmt: skip
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8, image_size=32,
        patch_size=16,
    )  # fmt: skip
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=4)
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=tiny_vae("flux2", seed),
        text_encoder=_build(Mistral3ForConditionalGeneration, {"config": config}, seed),
        tokenizer=tokenizer,
        transformer=tiny_flux2_transformer(seed, joint_attention_dim=48, guidance_embeds=True),
    )
