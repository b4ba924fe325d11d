"""DRaFT-K in flow-matching form (math.md section 7, M35): backprop the reward through the last K Euler steps.

Roll out without grad storing x_0..x_N (M2); L = -mean_b ReLU(r(x_N)); its theta-gradient with x_{N-K} held
constant comes from the truncated discrete adjoint (M23, ``flowkern.adjoint.truncated_backprop``: one step's
activations at a time). K fixed (default 1) or K ~ U{1..K} per update (``random_K``, VGG-Flow's baseline).
Unregularised: no fixed point (M35).
"""

from __future__ import annotations

import torch

from flowkern.adjoint import truncated_backprop
from flowkern.methods import _common as C


class DRaFT(C.RewardFeedbackMethod):
    """DRaFT-K (M35). ``loss(batch) -> (loss, metrics)``; ``loss.backward()`` runs the truncated adjoint (M23),
    accumulating theta's ``.grad`` scaled by the incoming gradient (so ``(loss / A).backward()`` accumulates).

    Args:
        velocity: v_theta(x, t, cond). reward: r(x) -> [B].
        K: number of differentiated final steps (1 <= K <= N). random_K: draw K ~ U{1..K} per loss call.
        relu: use -ReLU(r) (M35); False uses -r. With relu, a batch whose rewards are all <= 0 learns nothing:
            logged (see :class:`flowkern.methods._common.RewardFeedbackMethod`).
        generator: torch.Generator for the K draws.
    """

    def __init__(
        self,
        velocity: C.Velocity,
        reward: C.Reward,
        *,
        K: int = 1,
        random_K: bool = False,
        relu: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__(velocity, reward, relu=relu, generator=generator)
        self.K = C.check_int("K", K)
        self.random_K = bool(random_K)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        states, ts, cond = C.unpack_batch(batch)
        n_steps = ts.numel() - 1
        if self.K > n_steps:
            raise ValueError(f"K must be in [1, N] = [1, {n_steps}], got {self.K}")
        K = int(torch.randint(1, self.K + 1, (), generator=self.generator)) if self.random_K else self.K
        x_end = C.fetch(states[-1], self.compute_device(states, ts)).detach()
        r, g = C.reward_and_grad(self.reward, x_end)
        objective, extra = self.objective(r)
        if self.relu:  # d/dx of -mean ReLU(r): -1[r > 0] grad r / B
            g = g * C.batch_column((r > 0).float(), g)
        value = -objective.mean()
        terminal = (-g / x_end.shape[0]).to(x_end.dtype)

        def backward(scale: torch.Tensor) -> None:
            # (M23): theta.grad += sum over the last K steps, x_{N-K} held constant
            velocity = lambda x, t: self.velocity(x, t, cond)
            truncated_backprop(velocity, states, ts, terminal * scale.to(terminal.dtype), K)

        return C.deferred_loss(value, backward), {"loss": float(value), "K": float(K), **extra}
