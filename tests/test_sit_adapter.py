"""SiT adapter (flowkern.models.sit) on a tiny DiTTransformer2DModel built from config.

Convention under test (SiT's linear interpolant is paper time, M1): timestep = timestep_scale * t with no sigma
flip, v = output[:, :C] with no sign flip (learn_sigma channels dropped), labels in [0, num_classes), null class
num_classes for the unconditional CFG branch (M5), [2B] batch uncond first. LoRA through peft directly (DiT has
no diffusers peft mixin), saved in diffusers' LoRA file layout.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.models_tiny_backbones import (
    DIT_TINY,
    check_base_velocity_restores_on_error,
    check_detach_uncond,
    check_gradient_checkpointing,
    randn,
    randomize_lora,
    tiny_dit_transformer,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flowkern.models.base import FlowModel  # noqa: E402
from flowkern.models.lora import LORA_WEIGHT_NAME, load_lora  # noqa: E402
from flowkern.models.sit import SiTConditioning, SiTFlowModel  # noqa: E402

B, C, NULL = 2, DIT_TINY["in_channels"], DIT_TINY["num_embeds_ada_norm"]
LABELS = torch.tensor([3, 7])


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(dtype=torch.float32, **kwargs) -> SiTFlowModel:
    model = SiTFlowModel(tiny_dit_transformer(seed=0, dtype=dtype), **kwargs)
    model.add_lora(4)
    randomize_lora(model.transformer)
    return model


def _latents(side: int = 8, seed: int = 5, dtype=torch.float32) -> torch.Tensor:
    return randn(B, C, side, side, seed=seed, dtype=dtype)


def _direct(transformer, x, timestep, labels):
    return transformer(hidden_states=x, timestep=timestep, class_labels=labels, return_dict=False)[0]


def test_convention_timestep_is_t_and_labels_null_first():
    model = _model()
    seen = []
    model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    with torch.no_grad():
        model.velocity(_latents(), torch.tensor([0.2, 0.9]), SiTConditioning(LABELS, guidance_scale=2.0))
        model.velocity(_latents(), torch.tensor(0.25), SiTConditioning(LABELS))
    assert seen[0]["timestep"].dtype == torch.float32
    torch.testing.assert_close(seen[0]["timestep"], torch.tensor([0.2, 0.9, 0.2, 0.9]), rtol=0, atol=1e-7)  # no flip
    assert seen[0]["class_labels"].tolist() == [NULL, NULL, 3, 7]  # [uncond (null class); cond]
    torch.testing.assert_close(seen[1]["timestep"], torch.tensor([0.25, 0.25]), rtol=0, atol=0)
    scaled = _model(timestep_scale=1000.0)
    scaled.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    with torch.no_grad():
        scaled.velocity(_latents(), torch.tensor(0.25), SiTConditioning(LABELS))
    torch.testing.assert_close(seen[2]["timestep"], torch.tensor([250.0, 250.0]), rtol=0, atol=0)


def test_protocol_and_lora_targets():
    model = _model()
    assert isinstance(model, FlowModel) and model.num_classes == NULL
    wrapped = {n.rsplit(".lora_", 1)[0] for n, p in model.transformer.named_parameters() if p.requires_grad}
    assert wrapped == {f"transformer_blocks.{i}.attn1.to_{k}" for i in range(2) for k in ("q", "k", "v", "out.0")}


@pytest.mark.parametrize("w", [None, 4.0])
def test_velocity_equals_direct_transformer_call(w):
    model, x, t = _model(), _latents(), torch.tensor([0.3, 0.6])
    cond = SiTConditioning(LABELS, guidance_scale=w)
    plain = tiny_dit_transformer(seed=0)
    with torch.no_grad():
        v = model.velocity(x, t, cond)
        with model.base_velocity():
            v_base = model.velocity(x, t, cond)
        refs = []
        for net in (model.transformer, plain):
            c = _direct(net, x, t.float(), LABELS)[:, :C]  # learn_sigma: first C channels are the velocity
            if w is None:
                refs.append(c)
            else:
                u = _direct(net, x, t.float(), torch.full((B,), NULL))[:, :C]
                refs.append(u + w * (c - u))
    assert v.shape == x.shape
    torch.testing.assert_close(v, refs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_base, refs[1], rtol=1e-5, atol=1e-6)
    assert (v - v_base).abs().max() > 1e-3


def test_out_channels_equal_in_channels():
    model = SiTFlowModel(tiny_dit_transformer(seed=1, out_channels=C))
    x, t = _latents(), torch.tensor(0.5)
    with torch.no_grad():
        ref = _direct(model.transformer, x, torch.full((B,), 0.5), LABELS)
        torch.testing.assert_close(model.velocity(x, t, SiTConditioning(LABELS)), ref, rtol=0, atol=0)


def test_base_velocity_restores_adapters_on_error():
    check_base_velocity_restores_on_error(_model(), _latents(), SiTConditioning(LABELS, guidance_scale=2.0))


def test_detach_uncond_parameter_path_only():
    cond = SiTConditioning(LABELS, guidance_scale=3.0)
    check_detach_uncond(_model(), _latents(), torch.tensor(0.4), cond, SiTConditioning(LABELS), 3.0)


def test_time_derivative_through_adapter():
    """d v/d t flows through the timestep embedding (used by VGG-Flow's exact consistency, M21)."""
    model = SiTFlowModel(tiny_dit_transformer(seed=0).double())
    x, cond = _latents(dtype=torch.float64), SiTConditioning(LABELS)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    g = randn(*x.shape, seed=2, dtype=torch.float64)
    (dt,) = torch.autograd.grad((model.velocity(x, t, cond) * g).sum(), t)
    eps = 1e-4
    with torch.no_grad():
        fd = ((model.velocity(x, 0.4 + eps, cond) - model.velocity(x, 0.4 - eps, cond)) * g).sum() / (2 * eps)
    assert dt.abs() > 1e-6
    torch.testing.assert_close(dt, fd, rtol=2e-3, atol=1e-4)  # the timestep is passed in fp32


def test_gradient_checkpointing_same_gradients():
    check_gradient_checkpointing(_model(), _latents(), SiTConditioning(LABELS, guidance_scale=2.0))


def test_bf16_weights_fp32_lora():
    model = _model(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in model.trainable_parameters())
    v = model.velocity(_latents(), torch.tensor(0.5), SiTConditioning(LABELS, guidance_scale=2.0))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.trainable_parameters())


def test_bad_inputs():
    model = _model()
    cond = SiTConditioning(LABELS)
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 10\)"):
        model.velocity(_latents(), 0.5, SiTConditioning(torch.tensor([3, 10])))
    with pytest.raises(ValueError, match="labels must be class ids"):
        model.velocity(_latents(), 0.5, SiTConditioning(torch.tensor([-1, 2])))
    with pytest.raises(TypeError, match="integer"):
        SiTConditioning(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[B\]"):
        SiTConditioning(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="guidance_scale"):
        SiTConditioning(LABELS, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="square"):
        model.velocity(randn(B, C, 8, 6), 0.5, cond)
    with pytest.raises(ValueError, match=r"latents \[B, 4, H, W\]"):
        model.velocity(randn(B, 3, 8, 8), 0.5, cond)
    with pytest.raises(ValueError, match="batch"):
        model.velocity(_latents()[:1], 0.5, cond)
    with pytest.raises(TypeError, match="SiTConditioning"):
        model.velocity(_latents(), 0.5, LABELS)
    with pytest.raises(ValueError, match="timestep_scale"):
        SiTFlowModel(tiny_dit_transformer(), timestep_scale=0.0)
    with pytest.raises(ValueError, match="target_modules"):
        SiTFlowModel(tiny_dit_transformer()).add_lora(2, target_modules=["no_such_module"])


def test_from_pretrained_and_lora_file_round_trip(tmp_path):
    tiny_dit_transformer(seed=0).save_pretrained(tmp_path / "transformer")
    model = _model()
    file = model.save_lora(tmp_path / "lora")
    assert file.endswith(LORA_WEIGHT_NAME)
    from safetensors import safe_open

    with safe_open(file, "pt") as f:  # diffusers' layout: transformer.-prefixed keys, LoraConfig metadata
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in keys)
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.r"] == 4 and sorted(config["transformer.target_modules"]) == [
        "to_k",
        "to_out.0",
        "to_q",
        "to_v",
    ]
    loaded = SiTFlowModel.from_pretrained(tmp_path, local_files_only=True, lora_rank=4)
    randomize_lora(loaded.transformer, seed=11)
    load_lora(loaded.transformer, tmp_path / "lora")
    scaled = SiTFlowModel.from_pretrained(
        tmp_path / "transformer", subfolder=None, local_files_only=True, adapter_kwargs={"timestep_scale": 1000.0}
    )
    assert scaled.timestep_scale == 1000.0
    x, cond = _latents(), SiTConditioning(LABELS, guidance_scale=2.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, 0.3, cond), model.velocity(x, 0.3, cond), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match"):
        load_lora(SiTFlowModel.from_pretrained(tmp_path, local_files_only=True, lora_rank=2).transformer, file)
