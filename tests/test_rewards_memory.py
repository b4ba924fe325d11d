"""The reward-gradient memory table (flowkern.rewards.memory) against its measurements, and the planner model
``peak = fixed + per_image * B`` checked by exact CPU allocator peaks on reduced towers."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from flowkern.rewards import REWARDS  # noqa: E402
from flowkern.rewards.memory import REWARD_TOWERS, TOWERS, fit_fixed_per_image, reward_grad_peak_bytes  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "results", "rewards", "memory.json")


def test_table_equals_the_committed_measurements():
    with open(RESULTS) as f:
        measured = json.load(f)["towers"]
    assert set(TOWERS) == set(measured)
    for tower, (size, fits) in TOWERS.items():
        assert measured[tower]["image_size"] == size
        for ckpt in (False, True):
            row = measured[tower]["on" if ckpt else "off"]
            assert fits[ckpt] == (row["fit"]["fixed_bytes"], row["fit"]["per_image_bytes"])
            for b in (1, 4):  # the fit reproduces both measured points (to the per-image rounding: < 2 bytes)
                assert abs(reward_grad_peak_bytes(tower, b, ckpt) - row[f"B{b}"]["peak_bytes"]) <= 2
        assert reward_grad_peak_bytes(tower, 4, True) < reward_grad_peak_bytes(tower, 4, False)


def test_every_reward_has_a_tower():
    assert set(REWARD_TOWERS) == set(REWARDS)
    assert set(REWARD_TOWERS.values()) <= set(TOWERS)
    assert reward_grad_peak_bytes("pickscore", 2, False) == reward_grad_peak_bytes("vit-h-14", 2, False)
    with pytest.raises(ValueError, match="no measured tower 'vit-g'"):
        reward_grad_peak_bytes("vit-g", 1, False)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        reward_grad_peak_bytes("hpsv2", 0, False)
    with pytest.raises(ValueError, match="differ"):
        fit_fixed_per_image(10, 20, 2, 2)


@pytest.mark.parametrize("tower", ["tiny-clip", "tiny-blip"])
def test_peak_is_linear_in_the_batch(tower):
    """The planner's model: the B = 2 peak lies on the line through B = 1 and B = 4 (within 10 %)."""
    from benchmarks.rewards_memory import build, measure

    torch.set_num_threads(1)
    torch.manual_seed(0)
    reward, size = build(tower, checkpoint=False)
    peaks = {b: measure(reward, size, b)["peak_bytes"] for b in (1, 2, 4)}
    fixed, per_image = fit_fixed_per_image(peaks[1], peaks[4], 1, 4)
    assert per_image > 0
    assert abs(fixed + 2 * per_image - peaks[2]) <= 0.1 * peaks[2], peaks
