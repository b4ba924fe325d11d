"""Memory of the adjoint engine, measured exactly (torch profiler allocator events, design.md section 6).

(M23) invariant: recomputation keeps ONE step's activations alive, so peak(K) - peak(1) <= (K-1)
state_bytes + 5% of peak(1) for `truncated_backprop` and `lean_adjoint` (which returns K+1 adjoint
states) up to K = 20, while plain autograd through the unrolled K steps grows by at least one step's
activations per step (checked too, so the test can fail).

Parameter gradients are preallocated (zeros, as after ``zero_grad(set_to_none=False)``): with
``.grad = None`` the first backward hands autograd's buffer to ``.grad`` and every later step needs
one transient parameter-gradient buffer to accumulate into it, a constant in K (plain autograd pays
it too) that K = 1 alone avoids; `test_flat_in_K_with_unset_gradients` checks that case from K = 2.

The fused ops run on their `torch` backend here: on CPU the automatic choice is Triton's interpreter,
which leaves each launch's tensors in reference cycles until Python's cyclic GC runs, so freed
adjoint states would stay counted for a while (the engine itself holds no extra reference).
"""

from __future__ import annotations

import pytest
import torch

from flowkern.adjoint import lean_adjoint, truncated_backprop
from flowkern.ops import use_backend
from flowkern.sampling import sample_euler, sd3_shifted_grid
from tests.models_tiny import MLPVelocity, SD3Velocity, sd3_conditioning, tiny_sd3_transformer
from tests.utils import peak_memory

N = 20
KS = (1, 5, 20)


def retained_bytes(fn) -> int:
    """Net CPU allocator bytes still held when `fn` returns (its result kept alive), from the same
    profiler events as `peak_memory`."""
    from torch.profiler import ProfilerActivity, profile

    holder = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        holder.append(fn())
    raw = prof.profiler.kineto_results.events()
    return sum(e.nbytes() for e in raw if e.name() == "[memory]" and e.device_type().name == "CPU")


class Setup:
    def __init__(self, model: str):
        if model == "mlp":
            net = MLPVelocity(dim=256, hidden=512, depth=4)
            self.velocity, shape = net, (4, 16, 16)
        else:
            net = tiny_sd3_transformer().requires_grad_(True)
            text, pooled = sd3_conditioning(2)
            self.velocity, shape = SD3Velocity(net, text, pooled), (2, 4, 16, 16)  # 64 tokens
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.ts = sd3_shifted_grid(N)
        generator = torch.Generator().manual_seed(0)
        self.states = sample_euler(self.velocity, shape, self.ts, generator=generator).states
        self.terminal_grad = torch.randn(shape, generator=generator)
        self.state_bytes = self.terminal_grad.numel() * self.terminal_grad.element_size()
        self._peaks: dict[tuple[str, int, bool], int] = {}

    def peak(self, strategy: str, K: int, zero_grads: bool = True) -> int:
        """Peak bytes of one call (memoized: the tests share measurements)."""
        key = (strategy, K, zero_grads)
        if key not in self._peaks:
            self._peaks[key] = getattr(self, strategy)(K, zero_grads)
        return self._peaks[key]

    def reset_grads(self, zero: bool = True) -> None:
        for p in self.params:
            p.grad = torch.zeros_like(p) if zero else None

    def truncated(self, K: int, zero: bool = True) -> int:
        self.reset_grads(zero)
        return peak_memory(lambda: truncated_backprop(self.velocity, self.states, self.ts, self.terminal_grad, K))

    def lean(self, K: int, zero: bool = True) -> int:
        return peak_memory(lambda: lean_adjoint(self.velocity, self.states, self.ts, self.terminal_grad, K))

    def unrolled(self, K: int, zero: bool = True) -> int:
        self.reset_grads(zero)

        def run():
            x = self.states[N - K].detach().requires_grad_()
            for i in range(N - K, N):
                x = x + float(self.ts[i + 1] - self.ts[i]) * self.velocity(x, self.ts[i].float())
            torch.autograd.backward(x, self.terminal_grad)

        return peak_memory(run)

    def step_activation_bytes(self) -> int:
        """Bytes one step's graph keeps for backward (without its output state)."""
        x = self.states[N // 2].detach().requires_grad_()
        t, h = self.ts[N // 2].float(), float(self.ts[N // 2 + 1] - self.ts[N // 2])
        return retained_bytes(lambda: x + h * self.velocity(x, t)) - self.state_bytes


@pytest.fixture(scope="module", params=["mlp", "sd3"])
def setup(request):
    return Setup(request.param)


@pytest.fixture(autouse=True)
def _torch_ops_backend():
    with use_backend("torch"):
        yield


def bound(setup: Setup, K: int, peak_1: int) -> float:
    return (K - 1) * setup.state_bytes + 0.05 * peak_1


def test_truncated_backprop_flat_in_K(setup):
    peaks = {K: setup.peak("truncated", K) for K in KS}
    for K in KS[1:]:
        assert peaks[K] - peaks[1] <= bound(setup, K, peaks[1]), (K, peaks, setup.state_bytes)


def test_lean_adjoint_flat_in_K(setup):
    peaks = {K: setup.peak("lean", K) for K in KS}
    for K in KS[1:]:
        assert peaks[K] - peaks[1] <= bound(setup, K, peaks[1]), (K, peaks, setup.state_bytes)
    # the returned K+1 adjoint states are most of the growth: it cannot be smaller than (K-1) states
    assert peaks[KS[-1]] - peaks[1] >= (KS[-1] - 1) * setup.state_bytes


def test_unrolled_autograd_grows_by_a_step_per_step(setup):
    """The comparison the invariant is about: plain autograd keeps every step's activations."""
    activation = setup.step_activation_bytes()
    assert activation > 4 * setup.state_bytes  # a step's activations dwarf a state: the bounds above are tight
    peaks = {K: setup.peak("unrolled", K) for K in KS}
    for K in KS[1:]:
        assert peaks[K] - peaks[1] >= (K - 1) * activation, (K, peaks, activation)
    flowkern_peak = setup.peak("truncated", KS[-1])
    assert peaks[KS[-1]] > flowkern_peak + (KS[-1] - 1) * activation


def test_flat_in_K_with_unset_gradients(setup):
    peaks = {K: setup.peak("truncated", K, zero_grads=False) for K in (2, 20)}
    assert peaks[20] - peaks[2] <= bound(setup, 19, peaks[2]), peaks
