"""VGG-Flow's "LoRA copy of the transformer" value network (flowkern.models.value_net.TransformerValueNet)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.models_tiny import sd3_conditioning, tiny_sd3_transformer
from tests.models_tiny_backbones import randomize_lora, tiny_dit_transformer

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flowkern.methods import VGGFlow, flow_callables  # noqa: E402
from flowkern.models.sd3 import SD3Conditioning, SD3FlowModel  # noqa: E402
from flowkern.models.sit import SiTConditioning, SiTFlowModel  # noqa: E402
from flowkern.models.value_net import TransformerValueNet  # noqa: E402
from flowkern.train import TrainConfig, Trainer  # noqa: E402

B = 2


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sd3():
    model = SD3FlowModel(tiny_sd3_transformer(seed=0))
    model.add_lora(4)
    randomize_lora(model.transformer, seed=5)
    text, pooled = sd3_conditioning(B, seed=1)
    neg_text, neg_pooled = sd3_conditioning(B, seed=2)
    return model, SD3Conditioning(text, pooled, neg_text, neg_pooled, guidance_scale=2.0), (4, 8, 8)


def _sit():
    model = SiTFlowModel(tiny_dit_transformer(seed=0))
    model.add_lora(4)
    randomize_lora(model.transformer, seed=5)
    return model, SiTConditioning(torch.tensor([1, 3]), guidance_scale=2.0), (4, 8, 8)


@pytest.mark.parametrize("build", [_sd3, _sit], ids=["sd3", "sit"])
def test_zero_at_init_shares_base_and_is_disjoint_from_theta(build):
    model, cond, shape = build()
    value = TransformerValueNet(model, rank=4)
    x, t = torch.randn(B, *shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.7])
    v_before = model.velocity(x, t, cond).detach()
    c = value(x, t, cond)
    assert c.shape == x.shape and torch.equal(c, torch.zeros_like(c))  # lora_B = 0: exactly zero at init

    base = {n: p for n, p in model.transformer.named_parameters() if "lora_" not in n}
    copy = dict(value.flow.transformer.named_parameters())
    copy_base = dict(value.base_flow.transformer.named_parameters())
    assert {id(p) for p in copy_base.values()} == {id(p) for p in base.values()}  # LoRA-free copy: the same tensors
    assert {id(p) for n, p in copy.items() if "lora_" not in n} == {id(p) for p in base.values()}  # no 2nd backbone
    phi = [p for p in value.parameters() if p.requires_grad]
    theta = model.trainable_parameters()
    assert phi and all("lora_" in n for n, p in value.named_parameters() if p.requires_grad)
    assert not {id(p) for p in phi} & {id(p) for p in theta}

    with torch.no_grad():  # a non-zero value LoRA changes c_phi but never the policy's velocity
        for n, p in value.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(7))
    c = value(x, t, cond)
    assert c.abs().max() > 1e-4
    assert torch.equal(model.velocity(x, t, cond).detach(), v_before)
    c.square().sum().backward()  # gradients reach phi only
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in phi if p.dim() and p.shape[0] > 0)
    assert all(p.grad is None for p in theta)


def test_c_phi_keeps_its_x_dependence():
    """c_phi = v_copy - v_copy_base as a whole function of x (the 'exact' consistency mode differentiates it)."""
    model, cond, shape = _sd3()
    value = TransformerValueNet(model, rank=4)
    randomize_lora(value.flow.transformer, seed=9)
    x = torch.randn(B, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    t = torch.tensor([0.4, 0.6])
    direction = torch.randn_like(x)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no forward-mode AD
        _, jvp = torch.func.jvp(lambda y: value(y, t, cond), (x,), (direction,))
    eps = 1e-3
    fd = (value(x + eps * direction, t, cond) - value(x - eps * direction, t, cond)) / (2 * eps)
    torch.testing.assert_close(jvp, fd.detach(), rtol=2e-2, atol=2e-3)
    assert jvp.abs().max() > 1e-3  # not the policy-independent zero map


@pytest.mark.parametrize("consistency", ["fd", "exact"])
def test_vggflow_update_with_lora_copy_value_net(consistency):
    """Both consistency modes train through a real transformer: 'exact' (M21) runs its JVP through attention and
    through a LoRA-disabled base call inside torch.func."""
    model, cond, shape = _sd3()
    value = TransformerValueNet(model, rank=4)
    velocity, base_velocity = flow_callables(model, detach_uncond=True)

    def reward(x):
        return -(x - 0.5).square().flatten(1).mean(1)

    method = VGGFlow(velocity, base_velocity, reward, value_net=value, beta=5.0, subsample_fraction=0.5,
                     consistency=consistency, generator=torch.Generator().manual_seed(0))  # fmt: skip
    config = TrainConfig(batch_size=2, num_steps=3, num_updates=2, lr=1e-3, weight_decay=0.0, residual_probe=0)
    trainer = Trainer(model, reward, method, config, sample_shape=shape, cond_sampler=lambda n, g: cond)
    phi_before = [p.detach().clone() for p in method.value_parameters()]
    history = trainer.train(2)
    assert not trainer.skipped and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert "phi" in trainer.param_groups and all(h["grad_norm_phi"] > 0 for h in history)
    assert any(not torch.equal(p, q) for p, q in zip(method.value_parameters(), phi_before, strict=True))


def test_bad_model():
    with pytest.raises(TypeError, match="model must be"):
        TransformerValueNet(torch.nn.Linear(2, 2))
