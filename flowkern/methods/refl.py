"""ReFL in flow-matching form (math.md section 7, M34): reward feedback on the one-step prediction.

Roll out without grad (M2), pick a step i ~ U{N-last_steps .. N-1} per trajectory, and

    x_hat1 = x_i + (1 - t_i) v_theta(x_i, t_i)        (no stop-gradient: the reward gradient reaches theta)
    L = -mean_b ReLU(r(x_hat1))

i.e. (M23) with K = 1 and step 1 - t_i, written as one autograd graph (one velocity call). Unregularised: it
maximises reward and collapses; it has no fixed point (M35).
"""

from __future__ import annotations

import torch

from flowkern.methods import _common as C


class ReFL(C.RewardFeedbackMethod):
    """ReFL (M34). ``loss(batch) -> (loss, metrics)`` with a differentiable loss.

    Args:
        velocity: v_theta(x, t, cond) (see :mod:`flowkern.methods._common`). reward: r(x) -> [B].
        last_steps: i is drawn from the last ``last_steps`` steps (default 5: steps 15..19 of 20).
        relu: use -ReLU(r) (M34); False uses -r. With relu, a batch whose rewards are all <= 0 learns nothing:
            logged (see :class:`flowkern.methods._common.RewardFeedbackMethod`).
        generator: torch.Generator for the step draws.
    """

    def __init__(
        self,
        velocity: C.Velocity,
        reward: C.Reward,
        *,
        last_steps: int = 5,
        relu: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__(velocity, reward, relu=relu, generator=generator)
        self.last_steps = C.check_int("last_steps", last_steps)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        states, ts, cond = C.unpack_batch(batch)
        n_steps, n_traj = ts.numel() - 1, states.shape[1]
        if self.last_steps > n_steps:
            raise ValueError(f"last_steps must be in [1, N] = [1, {n_steps}], got {self.last_steps}")
        low = n_steps - self.last_steps
        step = low + torch.randint(self.last_steps, (n_traj,), generator=self.generator)
        step = step.to(states.device)
        traj = torch.arange(n_traj, device=states.device)
        x = C.fetch(states[step, traj], self.compute_device(states, ts)).detach()
        acc = C.acc_dtype(x)
        t = ts.to(device=x.device, dtype=acc)[step]
        v = self.velocity(x, t, C.gather_cond(cond, traj))
        x_hat1 = x + C.batch_column(1 - t, x).to(x.dtype) * v  # (M34): no sg, the gradient reaches theta
        r = C.check_reward_output(self.reward(x_hat1), x_hat1).to(acc)
        objective, extra = self.objective(r)
        loss = -objective.mean()
        return loss, {"loss": float(loss.detach()), "reward_x_hat1": float(r.detach().mean()), **extra}
