"""Traps a new user falls into (issue 14, item 8): ReFL and DRaFT with relu=True on rewards that are all <= 0."""

from __future__ import annotations

import pytest
import torch

from flowkern.methods import DRaFT, ReFL, flow_callables
from flowkern.models.toy import GaussianMixture, make_toy_model
from flowkern.sampling import uniform_grid


@pytest.mark.parametrize("cls", [ReFL, DRaFT])
def test_relu_on_all_negative_rewards_is_logged_and_relu_false_learns(cls, caplog):
    torch.manual_seed(0)
    model = make_toy_model(GaussianMixture.ring(4, radius=2.0, std=0.5), hidden=8, depth=2)
    v, _ = flow_callables(model)
    negative = lambda x: -(x.square().sum(-1)) - 1.0  # noqa: E731  always <= -1
    params = model.trainable_parameters()
    grads = {}
    for relu in (True, False):
        kwargs = {"last_steps": 2} if cls is ReFL else {"K": 2}
        method = cls(v, negative, relu=relu, generator=torch.Generator().manual_seed(1), **kwargs)
        batch = method.rollout(torch.randn(4, 2), uniform_grid(4))
        with caplog.at_level("WARNING", logger="flowkern.methods"):
            loss, metrics = method.loss(batch)
        for p in params:
            p.grad = None
        loss.backward()
        grads[relu] = sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)
        if relu:
            assert metrics["relu_active"] == 0.0 and "learns nothing" in caplog.text
            caplog.clear()
        else:
            assert "relu_active" not in metrics and "learns nothing" not in caplog.text
    assert grads[True] == 0.0 and grads[False] > 0.0
