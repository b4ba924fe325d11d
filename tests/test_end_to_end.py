"""End to end on tiny real backbones: VGG-Flow and deterministic adjoint matching (K = N), 3 updates each through
`flowkern.train.Trainer`, on tiny SD3, FLUX.1 and SiT, with a differentiable reward through the VAE decode
(`flowkern.models.vae.LatentDecoder`): a tiny CLIPScore for the text-conditional models, a tiny random
classifier's log-probability of the class for SiT. Conditioning objects (with CFG) travel through the trainer
and the methods' per-transition gathering. Checks: finite losses, no skipped update, the LoRA moved, the frozen
base weights did not.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.models_tiny import sd3_conditioning, tiny_sd3_transformer
from tests.models_tiny_backbones import (
    clip_tokenizer,
    randn,
    tiny_clip_model,
    tiny_dit_transformer,
    tiny_flux_transformer,
    tiny_vae,
)

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flowkern.methods import AdjointMatching, SmallValueNet, VGGFlow, flow_callables  # noqa: E402
from flowkern.models.flux import FluxConditioning, FluxFlowModel  # noqa: E402
from flowkern.models.sd3 import SD3Conditioning, SD3FlowModel  # noqa: E402
from flowkern.models.sit import SiTConditioning, SiTFlowModel  # noqa: E402
from flowkern.models.vae import LatentDecoder  # noqa: E402
from flowkern.rewards import CLIPScoreReward  # noqa: E402
from flowkern.train import TrainConfig, Trainer  # noqa: E402

SAMPLE_SHAPE = (4, 8, 8)  # 8x8 latents, 4 channels (tiny VAE), decoded to 16x16 RGB
PROMPT, TARGET_CLASS = "a red cat", 3


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyClassifier(nn.Module):
    """A frozen random image classifier over 10 classes (the SiT reward's stand-in for an ImageNet classifier)."""

    def __init__(self, num_classes: int = 10, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.head = nn.Linear(8, num_classes)
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(images)).mean(dim=(2, 3)))


class CondValueNet(nn.Module):
    """c_phi(x, t, cond) for VGG-Flow on an adapter conditioning: a SmallValueNet fed with the pooled text
    embedding (SD3/FLUX) or the class label (SiT)."""

    def __init__(self, cond_dim: int | None = None, num_classes: int | None = None):
        super().__init__()
        self.net = SmallValueNet(SAMPLE_SHAPE, hidden=16, depth=2, cond_dim=cond_dim, num_classes=num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        features = cond.labels if isinstance(cond, SiTConditioning) else cond.pooled_prompt_embeds
        return self.net(x, t, features)


def _clip_reward(decoder: LatentDecoder):
    tok = clip_tokenizer()
    clip = CLIPScoreReward(tiny_clip_model(tok, seed=0), tok)
    return lambda x: clip(decoder(x), [PROMPT] * x.shape[0])


def _class_reward(decoder: LatentDecoder):
    classifier = TinyClassifier()
    return lambda x: torch.log_softmax(classifier(decoder(x)), dim=-1)[:, TARGET_CLASS]


def _repeat(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.expand(n, *t.shape[1:]).contiguous()


def _backbone(name: str):
    """(model, reward, cond_sampler, value net) for a tiny backbone with a rank-4 LoRA and CFG w = 2."""
    decoder = LatentDecoder(tiny_vae("kl", seed=0), clamp="straight_through")
    if name == "sd3":
        model = SD3FlowModel(tiny_sd3_transformer(seed=0))
        text, pooled = sd3_conditioning(1, seed=1)
        neg_text, neg_pooled = sd3_conditioning(1, seed=2)

        def cond_sampler(n: int, generator: torch.Generator) -> SD3Conditioning:
            parts = (_repeat(v, n) for v in (text, pooled, neg_text, neg_pooled))
            return SD3Conditioning(*parts, guidance_scale=2.0)

        reward, value_net = _clip_reward(decoder), CondValueNet(cond_dim=pooled.shape[1])
    elif name == "flux":
        model = FluxFlowModel(tiny_flux_transformer(seed=0))
        text, pooled = randn(1, 8, 32, seed=1), randn(1, 32, seed=2)
        neg_text, neg_pooled = randn(1, 8, 32, seed=3), randn(1, 32, seed=4)

        def cond_sampler(n: int, generator: torch.Generator) -> FluxConditioning:
            return FluxConditioning(
                _repeat(text, n), _repeat(pooled, n), 3.5, _repeat(neg_text, n), _repeat(neg_pooled, n), 2.0
            )

        reward, value_net = _clip_reward(decoder), CondValueNet(cond_dim=32)
    else:
        model = SiTFlowModel(tiny_dit_transformer(seed=0))

        def cond_sampler(n: int, generator: torch.Generator) -> SiTConditioning:
            return SiTConditioning(torch.full((n,), TARGET_CLASS), guidance_scale=2.0)

        reward, value_net = _class_reward(decoder), CondValueNet(num_classes=model.num_classes)
    model.add_lora(4)
    return model, reward, cond_sampler, value_net


@pytest.mark.parametrize("method_name", ["vggflow", "adjoint_matching"])
@pytest.mark.parametrize("backbone", ["sd3", "flux", "sit"])
def test_three_updates_train_only_the_lora(backbone, method_name):
    model, reward, cond_sampler, value_net = _backbone(backbone)
    velocity, base_velocity = flow_callables(model, detach_uncond=True)
    generator = torch.Generator().manual_seed(0)
    if method_name == "vggflow":
        method = VGGFlow(velocity, base_velocity, reward, value_net=value_net, beta=10.0, subsample_fraction=0.5,
                         generator=generator)  # fmt: skip
    else:
        method = AdjointMatching(velocity, base_velocity, reward, beta=10.0, kind="ode", K=3)  # K = N: every step
    config = TrainConfig(batch_size=2, num_steps=3, num_updates=3, lr=1e-3, weight_decay=0.0, residual_probe=2)
    trainer = Trainer(model, reward, method, config, sample_shape=SAMPLE_SHAPE, cond_sampler=cond_sampler)

    base_before = {n: p.detach().clone() for n, p in model.transformer.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.transformer.named_parameters() if "lora_" in n}
    value_before = [p.detach().clone() for p in method.value_parameters()]
    history = trainer.train(3)

    assert not trainer.skipped, trainer.skipped
    assert trainer.updates == 3 and len(history) == 3
    for metrics in history:
        assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss", "reward_mean", "grad_norm_theta"))
        assert metrics["grad_norm_theta"] > 0
    after = dict(model.transformer.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items())  # frozen base untouched
    moved = [n for n, p in lora_before.items() if not torch.equal(after[n], p)]
    assert any("lora_B" in n for n in moved)  # lora_B starts at 0: only a real gradient moves it (no decay)
    assert len(moved) >= len(lora_before) // 2
    if method_name == "vggflow":
        assert any(not torch.equal(p, q) for p, q in zip(method.value_parameters(), value_before, strict=True))
