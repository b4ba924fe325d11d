"""Short CI version of issue 4's toy acceptance (math.md section 10; the long one is benchmarks/toy_alignment.py).

Toy: the 8-mode ring with its exact velocity (M38) + a zero-initialised residual MLP, N = 20, beta = 2 (lam = 0.5),
references from ``flowkern.metrics.ground_truth.toy_references`` at n = 400 samples:

- "bump" (a bump on mode 0): q* (M37) and p* (M36) are far apart and the base is far from both, so it tells the
  deterministic methods' fixed point from the KL one. VGG-Flow ('fd' and 'exact') and deterministic AM (K = N,
  p = 2) must end closer to q* than to p* and have covered a set fraction of the base's distance to q*.
- "bump_gap" (a bump between two modes): memoryless AM must end closer to p* than to q*, within a set fraction of
  the base's distance to p*.
- ReFL and DRaFT (no target) on "bump": reward at least the regularised methods' and lower diversity than them
  and the base (reward hacking).

Short runs (64 trajectories per update, 60-150 updates, one thread); thresholds are set with margin below what
these runs reach (the long benchmark reports the converged numbers). Runs once per module (cached fixtures).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.toy_alignment import RunConfig, references, run_method

N_EVAL = 400
SHORT = {
    "vggflow_fd": RunConfig(updates=150, batch_size=64, eval_every=150, n_eval=N_EVAL),
    "vggflow_exact": RunConfig(updates=100, batch_size=64, eval_every=100, n_eval=N_EVAL),
    "dam": RunConfig(updates=120, batch_size=64, eval_every=120, n_eval=N_EVAL),
    "am_memoryless": RunConfig(updates=100, batch_size=64, eval_every=100, n_eval=N_EVAL),
    "refl": RunConfig(updates=120, batch_size=64, eval_every=120, n_eval=N_EVAL),
    "draft": RunConfig(updates=120, batch_size=64, eval_every=120, n_eval=N_EVAL),
}
# fraction of the base model's ED to the target that a short run must have closed (ED_final <= frac * ED_base)
Q_FRACTION = {"vggflow_fd": 0.65, "vggflow_exact": 0.65, "dam": 0.15}
P_FRACTION = 0.3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def refs():
    return {name: references(name, N_EVAL) for name in ("bump", "bump_gap")}


@pytest.fixture(scope="module")
def runs(refs):
    cache = {}

    def get(method: str, reward: str):
        if (method, reward) not in cache:
            cache[method, reward] = run_method(method, refs[reward], SHORT[method])
        return cache[method, reward]

    return get


def test_references_are_distinguishable(refs):
    for r in refs.values():
        floor = max(r["floor_q"], r["floor_p"])
        assert r["q_to_p"] > 5 * floor, "q* and p* must be several noise floors apart"
    assert refs["bump"]["base_to_q"] > 3 * refs["bump"]["q_to_p"]
    assert refs["bump_gap"]["base_to_p"] > 10 * refs["bump_gap"]["floor_p"]


@pytest.mark.parametrize("method", ["vggflow_fd", "vggflow_exact", "dam"])
def test_deterministic_methods_approach_q_star(method, refs, runs):
    r = refs["bump"]
    res = runs(method, "bump")
    final = res["final"]
    assert res["skipped"] == 0
    assert final["ed_q"] < final["ed_p"], f"{method}: closer to p* ({final['ed_p']:.3f}) than q* ({final['ed_q']:.3f})"
    assert final["ed_q"] <= Q_FRACTION[method] * r["base_to_q"], (
        f"{method}: ED to q* {final['ed_q']:.3f} > {Q_FRACTION[method]} x base {r['base_to_q']:.3f}"
    )
    assert final["reward"] > r["reward_base"] + 0.1


def test_memoryless_am_approaches_p_star(refs, runs):
    r = refs["bump_gap"]
    final = runs("am_memoryless", "bump_gap")["final"]
    assert final["ed_p"] < final["ed_q"], f"closer to q* ({final['ed_q']:.3f}) than p* ({final['ed_p']:.3f})"
    assert final["ed_p"] <= P_FRACTION * r["base_to_p"], f"ED to p* {final['ed_p']:.3f} vs base {r['base_to_p']:.3f}"


@pytest.mark.parametrize("method", ["refl", "draft"])
def test_unregularised_methods_hack_the_reward(method, refs, runs):
    r = refs["bump"]
    final = runs(method, "bump")["final"]
    regularised = [runs(m, "bump")["final"] for m in ("dam", "vggflow_fd")]
    assert final["reward"] >= max(f["reward"] for f in regularised), "no higher reward than the regularised methods"
    assert final["diversity"] < min(f["diversity"] for f in regularised), "diversity not below the regularised runs"
    assert final["diversity"] < 0.85 * r["diversity_base"], "diversity did not fall"
