"""flowkern.train.Trainer: NaN/inf guard, gradient accumulation, per-group clipping, metrics, config validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from flowkern.methods import AdjointMatching, DRaFT, ReFL, VGGFlow, flow_callables
from flowkern.models.toy import GaussianMixture, make_toy_model
from flowkern.train import TrainConfig, Trainer


def toy(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return make_toy_model(GaussianMixture.ring(4, radius=2.0, std=0.5), hidden=16, depth=2, dtype=dtype)


def reward(x):
    return -(x - torch.tensor([1.5, 0.5], dtype=x.dtype)).square().sum(-1) + 4.0


def make_method(name, model, dtype=torch.float32):
    v, vb = flow_callables(model)
    if name == "vggflow":
        return VGGFlow(v, vb, reward, beta=1.0, alpha=10.0, sample_shape=(2,), subsample_fraction=None,
                       value_net=_small_value_net(dtype))  # fmt: skip
    if name == "dam":
        return AdjointMatching(v, vb, reward, beta=1.0, K=4)
    if name == "draft":
        return DRaFT(v, reward, K=2)
    if name == "refl":
        return ReFL(v, reward, last_steps=1)
    raise ValueError(name)


def _small_value_net(dtype):
    from flowkern.methods import SmallValueNet

    torch.manual_seed(1)
    net = SmallValueNet((2,), hidden=16, depth=2, dtype=dtype)
    torch.nn.init.normal_(net.out.weight, std=0.1)  # non-zero so the value net's gradient paths are exercised
    return net


def trainer_for(name, dtype=torch.float32, **cfg):
    model = toy(dtype)
    method = make_method(name, model, dtype)
    config = TrainConfig(**{"batch_size": 8, "num_steps": 4, "lr": 1e-2, "num_updates": 2, **cfg})
    return Trainer(model, reward, method, config, sample_shape=(2,), dtype=dtype)


def snapshot(trainer):
    params = [p.detach().clone() for g in trainer.optimizer.param_groups for p in g["params"]]
    return params, copy.deepcopy(trainer.optimizer.state_dict())


def assert_same_state(before, trainer):
    params, opt = before
    now = [p.detach() for g in trainer.optimizer.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(params, now)), "weights changed on a skipped step"
    state = trainer.optimizer.state_dict()["state"]
    assert state.keys() == opt["state"].keys()
    for k, v in opt["state"].items():
        for key, value in v.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state[k][key])), f"optimizer {key} changed"


# ---------------------------------------------------------------- NaN / inf guard
class Poisoned:
    """Wraps a method: on chosen calls adds sqrt(0 * sum p) (finite value 0, NaN gradient) or inf to the loss."""

    def __init__(self, method, params, poison):
        self.method, self.params, self.poison, self.calls = method, params, poison, 0

    def __getattr__(self, name):
        return getattr(self.method, name)

    def loss(self, batch):
        loss, metrics = self.method.loss(batch)
        kind = self.poison.get(self.calls)
        self.calls += 1
        if kind == "grad":
            loss = loss + torch.sqrt(0 * sum(p.sum() for p in self.params))
        elif kind == "loss":
            loss = loss * math.inf
        return loss, metrics


@pytest.mark.parametrize("kind,reason", [("grad", "non-finite gradient"), ("loss", "non-finite loss")])
@pytest.mark.parametrize("name", ["vggflow", "dam"])
def test_nan_guard_skips_and_leaves_state_untouched(name, kind, reason, caplog):
    trainer = trainer_for(name)
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    trainer.method = Poisoned(trainer.method, params, {1: kind})
    assert trainer.train_step()["skipped"] == 0.0  # a good step first: AdamW state exists
    tau = getattr(trainer.method.method, "tau", None)
    before = snapshot(trainer)
    with caplog.at_level("WARNING", logger="flowkern.train"):
        metrics = trainer.train_step()
    assert metrics["skipped"] == 1.0
    assert trainer.skipped == [(1, reason)]
    assert reason in caplog.text
    assert_same_state(before, trainer)
    assert all(p.grad is None for p in params)
    assert getattr(trainer.method.method, "tau", None) == tau  # (M9) tau untouched by a skipped update
    assert trainer.train_step()["skipped"] == 0.0 and trainer.updates == 2


def test_unbounded_divergence_is_caught_not_a_crash():
    """ReFL on an unbounded reward with an absurd learning rate: the guard skips non-finite updates."""
    model = toy()
    v, _ = flow_callables(model)
    lin = lambda x: 1e30 * x[:, 0]
    trainer = Trainer(model, lin, ReFL(v, lin, last_steps=1), TrainConfig(batch_size=8, num_steps=4, lr=1e3,
                      grad_clip=None), sample_shape=(2,))  # fmt: skip
    history = trainer.train(6)
    assert len(history) == 6
    assert trainer.skipped, "expected non-finite updates to be skipped"


# ---------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("name", ["dam", "vggflow", "draft"])
def test_accumulation_equals_one_big_batch(name):
    one = trainer_for(name, dtype=torch.float64, batch_size=8, grad_accum_steps=1)
    two = trainer_for(name, dtype=torch.float64, batch_size=4, grad_accum_steps=2)
    for _ in range(2):
        m1, m2 = one.train_step(), two.train_step()
        assert m1["skipped"] == m2["skipped"] == 0.0
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-10)
        assert m1["reward_mean"] == pytest.approx(m2["reward_mean"], rel=1e-10)
    for a, b in zip(snapshot(one)[0], snapshot(two)[0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    if name == "vggflow":
        assert one.method.tau == pytest.approx(two.method.tau, rel=1e-12)


# ---------------------------------------------------------------- groups, clipping, metrics
def test_separate_groups_clipped_separately():
    trainer = trainer_for("vggflow", grad_clip=1e-3)
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["theta", "phi"]
    seen = {}

    def spy(optimizer, args, kwargs):
        for g in optimizer.param_groups:
            grads = [p.grad for p in g["params"] if p.grad is not None]
            seen[g["name"]] = float(torch.nn.utils.get_total_norm(grads))

    trainer.optimizer.register_step_pre_hook(spy)
    metrics = trainer.train_step()
    for name in ("theta", "phi"):
        pre = metrics[f"grad_norm_{name}"]
        assert pre > 1e-3
        assert seen[name] == pytest.approx(1e-3, rel=1e-4)  # each group clipped to 1e-3 on its own (M19)


@pytest.mark.parametrize("name", ["vggflow", "dam", "draft", "refl"])
def test_metrics_present(name):
    trainer = trainer_for(name)
    metrics = trainer.train_step()
    for key in ("reward_mean", "reward_std", "loss", "grad_norm_theta", "residual_velocity_sq", "time_s", "skipped",
                "step", "updates"):  # fmt: skip
        assert key in metrics and math.isfinite(metrics[key]), key
    if name == "vggflow":
        for key in ("loss_match", "loss_cons", "loss_bnd", "grad_norm_phi", "tau"):
            assert key in metrics and math.isfinite(metrics[key]), key
    assert len(trainer.history) == 1


def test_residual_velocity_zero_at_init_then_positive():
    trainer = trainer_for("dam")
    first = trainer.train_step()
    assert first["residual_velocity_sq"] == 0.0  # zero-initialised residual: v_theta == v_base
    second = trainer.train_step()
    assert second["residual_velocity_sq"] > 0.0


def test_shifted_grid_and_callback():
    trainer = trainer_for("dam", time_grid="shifted", num_steps=5)
    assert trainer.ts.numel() == 6 and float(trainer.ts[1]) < 0.2
    seen = []
    trainer.train(2, callback=lambda tr, m: seen.append(m["step"]))
    assert seen == [0.0, 1.0]


@pytest.mark.parametrize("kw", [
    dict(batch_size=0), dict(grad_accum_steps=0), dict(lr=0.0), dict(lr=math.nan), dict(grad_clip=-1.0),
    dict(time_grid="cosine"), dict(betas=(0.9, 1.0)), dict(weight_decay=-0.1), dict(num_steps=1.5),
])  # fmt: skip
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError, match="TrainConfig"):
        TrainConfig(**kw)


def test_trainer_rejects_bad_arguments():
    model = toy()
    with pytest.raises(TypeError, match="method"):
        Trainer(model, reward, object(), TrainConfig(), sample_shape=(2,))
    with pytest.raises(TypeError, match="reward"):
        Trainer(model, None, make_method("dam", model), TrainConfig(), sample_shape=(2,))
    with pytest.raises(TypeError, match="config"):
        Trainer(model, reward, make_method("dam", model), {"lr": 1.0}, sample_shape=(2,))
