"""The Method protocol, the method registry and the reward registry (issue 14, deliverable 3)."""

from __future__ import annotations

import inspect

import pytest
import torch

from flowkern.methods import AdjointMatching, VGGFlow, flow_callables
from flowkern.methods.base import Method, MethodBase, missing_members
from flowkern.methods.registry import METHODS, MethodSettings, build_method
from flowkern.models.toy import GaussianMixture, make_toy_model
from flowkern.rewards import REWARDS, build_reward
from flowkern.rewards.registry import REGISTRY, reward_entry, reward_names
from flowkern.train import TrainConfig, Trainer


def _toy():
    torch.manual_seed(0)
    model = make_toy_model(GaussianMixture.ring(4, radius=2.0, std=0.5), hidden=8, depth=2)
    return model, *flow_callables(model)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_follows_the_protocol_and_trains(name):
    model, v, vb = _toy()
    reward = lambda x: -(x - 1).square().sum(-1)  # noqa: E731
    method = build_method(name, v, vb, reward, MethodSettings(K=2), num_steps=4, sample_shape=(2,))
    assert isinstance(method, METHODS[name].cls) and isinstance(method, Method) and missing_members(method) == []
    hyper = method.hyperparameters()
    assert hyper and all(isinstance(v, bool | int | float | str | list) for v in hyper.values())
    assert not set(hyper) & set(method.state_dict())  # state is not a hyperparameter
    trainer = Trainer(model, reward, method, TrainConfig(batch_size=4, num_steps=4), sample_shape=(2,))
    assert trainer.train_step()["skipped"] == 0.0
    assert {f"method.{k}" for k in hyper} <= set(trainer.settings())


def test_the_trainer_refuses_a_method_outside_the_protocol():
    model, v, _ = _toy()

    class Partial:  # rollout and loss only: the optional hooks come from MethodBase, which it does not use
        reward = None

        def rollout(self, x0, ts, cond=None, generator=None): ...

        def loss(self, batch): ...

    with pytest.raises(TypeError, match=r"Partial lacks \['generator', 'micro_batch', 'value_parameters'"):
        Trainer(model, lambda x: x.sum(-1), Partial(), sample_shape=(2,))

    class Complete(MethodBase, Partial):
        pass

    assert missing_members(Complete()) == []


def test_method_settings_defaults_are_the_constructors():
    default = lambda cls, arg: inspect.signature(cls.__init__).parameters[arg].default  # noqa: E731
    s = MethodSettings()
    assert (s.p, s.eta, s.alpha, s.subsample) == (
        default(AdjointMatching, "p"),
        default(VGGFlow, "eta_mode"),
        default(VGGFlow, "alpha"),
        default(VGGFlow, "subsample_fraction"),
    )
    from flowkern.app.run import TrainOptions

    o = TrainOptions()
    assert (o.p, o.eta, o.alpha, o.subsample) == (s.p, s.eta, s.alpha, s.subsample)


def test_the_registry_reads_table_covers_exactly_the_settings_that_act():
    assert METHODS["vggflow"].reads and "K" not in METHODS["vggflow"].reads and "beta" not in METHODS["refl"].reads
    settings = {f for entry in METHODS.values() for f in entry.reads} - {"value_lr"}
    assert settings <= set(MethodSettings.__dataclass_fields__)


@pytest.mark.parametrize("n_steps,expected", [(20, (5, 5)), (40, (10, 10)), (4, (1, 1))])
def test_memoryless_am_trains_a_quarter_plus_a_quarter_of_any_grid(n_steps, expected):
    _, v, vb = _toy()
    am = AdjointMatching(v, vb, lambda x: x.sum(-1), beta=1.0, kind="memoryless", generator=torch.Generator())
    rows = am._transitions(n_steps, 3, "cpu")
    assert rows.shape == (3, sum(expected))
    assert (rows[:, -expected[0] :] == torch.arange(n_steps - expected[0], n_steps)).all()  # the last quarter (M33)


def test_one_reward_registry():
    assert set(REWARDS) == set(reward_names("image", weights=True))
    assert set(reward_names("toy")) == {"linear", "bump"} and set(reward_names("image", weights=False)) == {
        "redness",
        "brightness",
    }
    assert reward_entry("HPS-v2.1").name == "hpsv2.1"
    assert type(build_reward("Redness")).__name__ == "RednessReward"
    x = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    assert build_reward("linear")(x).tolist() == [4.0, 0.0]
    with pytest.raises(ValueError, match="unknown reward 'nope'; known"):
        build_reward("nope")
    assert all(entry.domain in ("image", "toy") for entry in REGISTRY.values())
