"""flowkern.metrics.diversity (known answers) and the demo's pixel rewards (flowkern.rewards.toy_image)."""

from __future__ import annotations

import math

import pytest
import torch

from flowkern.metrics.diversity import (
    FlattenFeatures,
    RandomProjectionFeatures,
    default_extractor,
    diversity,
    pairwise_distances,
    prior_preservation,
)
from flowkern.rewards.toy_image import BrightnessReward, RednessReward

FLAT = FlattenFeatures()


def test_diversity_known_answer_three_points():
    # |a-b| = 5, |a-c| = 8, |b-c| = 5: the mean over the three pairs is 6
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 8.0]])
    assert diversity(x, FLAT) == pytest.approx(6.0, abs=1e-6)
    d = pairwise_distances(FLAT(x))
    assert torch.equal(d, d.T) and torch.all(d.diag() == 0)
    torch.testing.assert_close(d, torch.cdist(x, x), atol=1e-6, rtol=0)


def test_collapsed_batch_has_zero_diversity_and_identical_pairs_zero_prior_distance():
    x = torch.randn(1, 3, 8, 8).expand(5, 3, 8, 8).clone()
    assert diversity(x) == pytest.approx(0.0, abs=1e-12)
    base = torch.randn(4, 3, 8, 8)
    assert prior_preservation(base.clone(), base) == 0.0


def test_prior_preservation_is_the_mean_paired_distance():
    base = torch.randn(6, 2, dtype=torch.float64)
    shifts = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    tuned = base + shifts  # distances 5, 1, 10, 0, 1, 2 -> mean 19/6
    assert prior_preservation(tuned, base, FLAT) == pytest.approx(19 / 6, rel=1e-12)
    # pairing matters: a permuted batch is not "the same samples"
    assert prior_preservation(base[[1, 0, 2, 3, 4, 5]], base, FLAT) > 0


def test_cosine_metric():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # pairs: orthogonal (1), parallel (0), orthogonal (1)
    assert diversity(x, FLAT, metric="cosine") == pytest.approx(2 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="metric"):
        diversity(x, FLAT, metric="manhattan")


def test_random_projection_estimates_per_pixel_distance_and_is_deterministic():
    black, white = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
    grey = torch.full((1, 3, 16, 16), 0.5)
    images = torch.cat([black, white, grey])
    f = RandomProjectionFeatures(size=8, dim=256, seed=0)
    # per-pixel RMS distances: black-white 1, black-grey 0.5, white-grey 0.5 -> mean 2/3
    assert diversity(images, f) == pytest.approx(2 / 3, rel=0.2)
    assert torch.equal(f(images), RandomProjectionFeatures(size=8, dim=256, seed=0)(images))
    assert not torch.equal(f(images), RandomProjectionFeatures(size=8, dim=256, seed=1)(images))
    # resolution-independent: the same picture at 32x32 gives the same features (area downsampling to 8x8)
    big = torch.nn.functional.interpolate(images, size=32, mode="nearest")
    torch.testing.assert_close(f(big), f(images), atol=1e-5, rtol=1e-5)


def test_random_projection_of_vectors_and_distances_scale():
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    f = RandomProjectionFeatures(dim=2048)
    exact = diversity(x, FLAT) / math.sqrt(32)
    assert diversity(x, f) == pytest.approx(exact, rel=0.1)


def test_default_extractor_is_builtin_without_dreamsim():
    extractor = default_extractor()
    assert getattr(extractor, "name", "") in ("random_projection", "dreamsim")
    assert extractor(torch.rand(2, 3, 16, 16)).shape[0] == 2


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: diversity(torch.zeros(1, 4)), "at least 2"),
        (lambda: diversity(torch.tensor([[float("nan"), 0.0], [0.0, 0.0]])), "NaN"),
        (lambda: diversity(torch.zeros(3, 4, dtype=torch.long)), "floating"),
        (lambda: diversity([[0.0], [1.0]]), "torch.Tensor"),
        (lambda: prior_preservation(torch.zeros(3, 2), torch.zeros(4, 2)), "same shape"),
        (lambda: diversity(torch.zeros(3, 4), lambda x: x.sum(1)), r"\[B, F\]"),
        (lambda: RandomProjectionFeatures(size=0), "size"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---------------------------------------------------------------- pixel rewards
def _solid(rgb, n=2, size=4):
    return torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def test_pixel_rewards_known_values():
    red, white, green = _solid([1.0, 0.0, 0.0]), _solid([1.0, 1.0, 1.0]), _solid([0.0, 1.0, 0.0])
    redness, brightness = RednessReward(), BrightnessReward()
    assert torch.allclose(redness(red), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(redness(white), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(redness(green), torch.full((2,), -0.5, dtype=torch.float64))
    assert torch.allclose(brightness(white), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(brightness(green), torch.full((2,), 0.587, dtype=torch.float64))
    half = red.clone()
    half[..., :2] = 0.0  # left half black: redness halves
    assert torch.allclose(redness(half), torch.full((2,), 0.5, dtype=torch.float64))


def test_pixel_rewards_are_differentiable_with_the_expected_gradient():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    RednessReward()(x).sum().backward()
    n = 16  # pixels
    expected = torch.tensor([1.0, -0.5, -0.5], dtype=torch.float64).view(1, 3, 1, 1).expand(2, 3, 4, 4) / n
    torch.testing.assert_close(x.grad, expected)
    assert torch.autograd.gradcheck(lambda y: BrightnessReward()(y), (x.detach().clone().requires_grad_(),))


def test_pixel_rewards_reject_out_of_range_and_take_no_weights():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RednessReward()(torch.full((1, 3, 4, 4), 2.0))
    assert isinstance(RednessReward.from_pretrained(), RednessReward)
    with pytest.raises(TypeError, match="no weights"):
        RednessReward.from_pretrained("some/model")
