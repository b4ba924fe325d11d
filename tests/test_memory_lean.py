"""Memory-lean updates (issue 15): the fixes change where memory goes, never what the methods compute.

- Micro-batches (``micro_batch``): DAM, AM and VGG-Flow give the loss, gradients and tau of one batch, with one
  micro-batch's graph alive at a time; exact CPU peaks (allocator events, ``peak_memory``) show DAM's peak flat in
  K and VGG-Flow's flat in the number of transitions, while one batch grows.
- Gradient checkpointing recomputes with the LoRA state of the forward: the base velocity's VJP (lean adjoint,
  VGG-Flow's 'exact' T3) is right with the LoRA off, in every method, on tiny SD3 and SiT with CFG.
- VGG-Flow's 'exact' consistency runs through a diffusers AutoencoderKL decode (Hessian-vector products instead
  of forward-over-reverse, which fails in group_norm).
- peft's fp32 LoRA casts each bf16 input once (one saved fp32 copy for to_q/to_k/to_v instead of three).
- DAM decodes x_N once per update (the Trainer logs the rollout's own reward).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flowkern.methods import AdjointMatching, DRaFT, SmallValueNet, VGGFlow, flow_callables
from flowkern.models.base import ResidualFlowModel
from flowkern.ops import use_backend
from flowkern.sampling import uniform_grid
from flowkern.train import TrainConfig, Trainer
from tests.models_tiny import sd3_conditioning, tiny_sd3_transformer
from tests.models_tiny_backbones import randn, saved_bytes, tiny_dit_transformer, tiny_vae
from tests.utils import peak_memory

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flowkern.models.sd3 import SD3Conditioning, SD3FlowModel  # noqa: E402
from flowkern.models.sit import SiTConditioning, SiTFlowModel  # noqa: E402
from flowkern.models.vae import LatentDecoder  # noqa: E402

SAMPLE_SHAPE = (4, 8, 8)  # tiny VAE latents -> 16x16 RGB


@pytest.fixture(autouse=True)
def _one_thread_torch_ops():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with use_backend("torch"):  # no Triton-interpreter reference cycles in the allocator counts
        yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- tiny backbones with CFG, LoRA and a VAE reward
class LabelOrPooledValueNet(nn.Module):
    def __init__(self, cond_dim=None, num_classes=None):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = SmallValueNet(SAMPLE_SHAPE, hidden=8, depth=2, cond_dim=cond_dim, num_classes=num_classes)
        with torch.no_grad():  # a non-zero c_phi, so the consistency terms are not trivial
            self.net.out.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))

    def forward(self, x, t, cond):
        return self.net(x, t, cond.labels if isinstance(cond, SiTConditioning) else cond.pooled_prompt_embeds)


def _backbone(name: str):
    """(model, cond, reward through a tiny AutoencoderKL, decoder, value net); CFG w = 2, LoRA rank 4 (random B)."""
    if name == "sd3":
        model = SD3FlowModel(tiny_sd3_transformer(seed=0))
        text, pooled = sd3_conditioning(2, seed=1)
        neg_text, neg_pooled = sd3_conditioning(2, seed=2)
        cond = SD3Conditioning(text, pooled, neg_text, neg_pooled, guidance_scale=2.0)
        value_net = LabelOrPooledValueNet(cond_dim=pooled.shape[1])
    else:
        model = SiTFlowModel(tiny_dit_transformer(seed=0))
        cond = SiTConditioning(torch.tensor([3, 7]), guidance_scale=2.0)
        value_net = LabelOrPooledValueNet(num_classes=model.num_classes)
    model.add_lora(4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    decoder = LatentDecoder(tiny_vae("kl", seed=0), clamp="none")
    reward = lambda x: decoder(x)[:, 0].flatten(1).mean(1) - decoder(x)[:, 1:].square().flatten(1).mean(1)
    return model, cond, reward, decoder, value_net


def _method(name: str, model, reward, value_net, micro_batch):
    velocity, base_velocity = flow_callables(model)
    if name == "dam":
        return AdjointMatching(velocity, base_velocity, reward, beta=10.0, K=3, micro_batch=micro_batch)
    if name == "draft":  # the truncated adjoint: v_theta's VJP with v_u's parameters detached (functional_call)
        return DRaFT(velocity, reward, K=2, relu=False)
    if name == "am":
        return AdjointMatching(
            velocity, base_velocity, reward, beta=10.0, kind="memoryless", n_last=2, n_random=1,
            generator=torch.Generator().manual_seed(5), micro_batch=micro_batch,
        )  # fmt: skip
    consistency = name.split("-")[1]
    eps = 0.05  # fp32 differences: a larger step than the default keeps rounding / eps small in the comparison
    return VGGFlow(
        velocity, base_velocity, reward, value_net=value_net, beta=10.0, alpha=3.0, consistency=consistency,
        subsample_fraction=None, tau0=0.05, eps_x=eps, eps_t=eps, micro_batch=micro_batch,
    )  # fmt: skip


def _loss_and_grads(backbone: str, method_name: str, lean: bool):
    """One loss + backward; ``lean``: micro_batch 1, per-block checkpointing of the transformer and the VAE."""
    model, cond, reward, decoder, value_net = _backbone(backbone)
    if lean:
        model.set_gradient_checkpointing(True)
        decoder.set_gradient_checkpointing(True)
    method = _method(method_name, model, reward, value_net, 1 if lean else None)
    ts = uniform_grid(4)
    batch = method.rollout(randn(2, *SAMPLE_SHAPE, seed=6), ts, cond)
    loss, metrics = method.loss(batch)
    loss.backward()
    params = model.trainable_parameters() + list(method.value_parameters())
    assert all(p.grad is not None for p in model.trainable_parameters())
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("method_name", ["dam", "am", "vggflow-fd", "vggflow-exact", "draft"])
@pytest.mark.parametrize("backbone", ["sd3", "sit"])
def test_lean_update_equals_plain_update(backbone, method_name):
    """micro_batch = 1 with gradient checkpointing (LoRA off in the base velocity's VJPs: the lean adjoint of DAM and
    AM, VGG-Flow exact's T3; DRaFT's VJP through v_u's detached parameters) gives the loss and gradients of one
    batch without checkpointing. 'exact' runs through the AutoencoderKL decode (group_norm)."""
    loss, grads, metrics = _loss_and_grads(backbone, method_name, lean=False)
    lean_loss, lean_grads, lean_metrics = _loss_and_grads(backbone, method_name, lean=True)
    assert torch.isfinite(loss) and loss.abs() > 0
    torch.testing.assert_close(lean_loss, loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(lean_grads, grads, strict=True):  # fp32 rounding of B- vs 1-sample calls, amplified by fd's 1/eps
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()))
    assert any(g.abs().max() > 0 for g in grads)
    for key in ("loss_cons", "adjoint_norm", "reward_grad_norm"):
        if key in metrics:
            assert lean_metrics[key] == pytest.approx(metrics[key], rel=1e-5)


@pytest.mark.parametrize("backbone", ["sd3", "sit"])
def test_checkpointed_base_velocity_vjp_recomputes_with_lora_off(backbone):
    """The VJP of the base velocity runs its backward after base_velocity() exits: the default checkpoint function
    restores the forward's LoRA state; diffusers' stock one recomputes with the LoRA on and fails."""
    model, cond, *_ = _backbone(backbone)
    velocity, base_velocity = flow_callables(model)
    x, t = randn(2, *SAMPLE_SHAPE, seed=8), torch.tensor([0.3, 0.6])
    cot = randn(2, *SAMPLE_SHAPE, seed=9)

    def vjp():
        xx = x.clone().requires_grad_(True)
        return torch.autograd.grad(base_velocity(xx, t, cond), xx, cot)[0]

    def lora_on_vjp():
        xx = x.clone().requires_grad_(True)
        return torch.autograd.grad(velocity(xx, t, cond), xx, cot)[0]

    plain, with_lora = vjp(), lora_on_vjp()
    assert (plain - with_lora).abs().max() > 1e-4  # the LoRA changes the Jacobian: the check below can fail
    model.set_gradient_checkpointing(True)
    torch.testing.assert_close(vjp(), plain, rtol=1e-5, atol=1e-7)
    model.transformer.enable_gradient_checkpointing()  # diffusers' own function: no LoRA state on recomputation
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        vjp()


def test_exact_consistency_hessian_vector_product_through_vae():
    """(M21) the derivative of grad r along dy is H(y) dy: equal to central differences of grad r through the VAE
    (fp64), where forward-mode AD through group_norm raises."""
    from flowkern.methods._common import reward_grad_and_hvp

    decoder = LatentDecoder(tiny_vae("kl", seed=0, dtype=torch.float64), clamp="none")
    reward = lambda y: decoder(y).square().flatten(1).mean(1)
    y, dy = randn(2, *SAMPLE_SHAPE, seed=1, dtype=torch.float64), randn(2, *SAMPLE_SHAPE, seed=2, dtype=torch.float64)
    g, hv = reward_grad_and_hvp(reward, y, dy)

    def grad_at(z):
        z = z.detach().requires_grad_(True)
        return torch.autograd.grad(reward(z).sum(), z)[0]

    eps = 1e-5
    torch.testing.assert_close(g, grad_at(y), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hv, (grad_at(y + eps * dy) - grad_at(y - eps * dy)) / (2 * eps), rtol=1e-6, atol=1e-9)
    with pytest.raises(RuntimeError, match="view size"), sdpa_kernel(SDPBackend.MATH):  # why not forward-over-reverse
        torch.func.jvp(torch.func.grad(lambda z: reward(z).sum()), (y,), (dy,))


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float64, 1e-9), (torch.float32, 1e-3)])
def test_central_reward_hvp_matches_double_backward_through_vae(dtype, bound):
    """reward_hvp='central' (M21's H(y) dy as a central difference of two reward gradients, the pipelines' default):
    the gradient equals the double backward's and H dy is within its O(eps^2) + rounding error, through a
    checkpointed AutoencoderKL decode (per sample, relative; measured 1.8e-10 in fp64, 1.0e-4 in fp32)."""
    from flowkern.methods._common import reward_grad_and_hvp

    decoder = LatentDecoder(tiny_vae("kl", seed=0, dtype=dtype), clamp="none")
    reward = lambda y: decoder(y).square().flatten(1).mean(1)
    y, dy = randn(2, *SAMPLE_SHAPE, seed=1, dtype=dtype), randn(2, *SAMPLE_SHAPE, seed=2, dtype=dtype)
    g, hv = reward_grad_and_hvp(reward, y, dy, "autograd")
    decoder.set_gradient_checkpointing(True)
    g_c, hv_c = reward_grad_and_hvp(reward, y, dy, "central")
    rel = lambda a, b: float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max())
    assert hv_c.dtype == dtype and rel(g_c, g) < 1e-6 and rel(hv_c, hv) < bound
    zero = torch.zeros_like(dy)
    zero[1] = dy[1]  # a zero direction gives H 0 = 0 exactly (no division by |dy| = 0)
    hv_z = reward_grad_and_hvp(reward, y, zero, "central")[1]
    assert bool((hv_z[0] == 0).all()) and rel(hv_z[1:], hv[1:]) < bound
    with pytest.raises(ValueError, match="reward_hvp must be one of"):
        reward_grad_and_hvp(reward, y, dy, "forward")


@pytest.mark.parametrize("backbone", ["sd3", "sit"])
def test_vggflow_exact_with_central_reward_hvp_matches_autograd(backbone, monkeypatch):
    """VGG-Flow 'exact' with reward_hvp='central' gives the loss and gradients of 'autograd' (measured: equal loss,
    gradients within 5e-7 relative), while dropping H dy changes the gradients by 4e-4..4e-3: the comparison sees
    the HVP. T3 now runs outside SDPA's math kernel: unchanged on CPU (the other exact tests)."""
    import flowkern.methods._common as C

    def run(mode):
        model, cond, reward, _, value_net = _backbone(backbone)
        velocity, base_velocity = flow_callables(model)
        method = VGGFlow(
            velocity, base_velocity, reward, value_net=value_net, beta=10.0, alpha=3.0, consistency="exact",
            reward_hvp=mode, subsample_fraction=None, tau0=0.05,
        )  # fmt: skip
        loss, _ = method.loss(method.rollout(randn(2, *SAMPLE_SHAPE, seed=6), uniform_grid(4), cond))
        loss.backward()
        params = model.trainable_parameters() + list(method.value_parameters())
        return loss.detach(), torch.cat([p.grad.flatten() for p in params if p.grad is not None])

    loss, grads = run("autograd")
    loss_c, grads_c = run("central")
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=0)
    assert float((grads_c - grads).norm() / grads.norm()) < 1e-5
    exact = C.reward_grad_and_hvp
    monkeypatch.setattr(C, "reward_grad_and_hvp", lambda *a: (exact(*a)[0], torch.zeros_like(a[1])))
    assert float((run("autograd")[1] - grads).norm() / grads.norm()) > 1e-4
    with pytest.raises(ValueError, match="reward_hvp"):
        run("double")


SDPA = torch.nn.functional.scaled_dot_product_attention  # query_chunked_attention replaces the attribute


class QueryLengths(torch.overrides.TorchFunctionMode):
    """Records the query length of every scaled_dot_product_attention call."""

    def __init__(self, sizes: list):
        super().__init__()
        self.sizes = sizes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is SDPA:
            self.sizes.append((kwargs or {}).get("query", args[0] if args else None).shape[-2])
        return func(*args, **(kwargs or {}))


def test_query_chunked_attention_equals_sdpa_under_jvp():
    """query_chunked_attention (M21's JVPs): SDPA's math kernel in query chunks gives the unchunked value and JVP
    (fp64, with a per-query mask, a broadcast mask and none; chunks that do not divide L), and calls SDPA per chunk."""
    from flowkern.methods._common import query_chunked_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64) for n in (11, 7, 7))
    tangents = tuple(torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (q, k, v))
    sizes = []
    for mask in (None, torch.randn(11, 7, generator=g, dtype=torch.float64), torch.rand(1, 7, generator=g) > 0.3):
        attention = lambda *qkv, m=mask: torch.nn.functional.scaled_dot_product_attention(*qkv, attn_mask=m)
        with sdpa_kernel(SDPBackend.MATH):
            out, tangent = torch.func.jvp(attention, (q, k, v), tangents)
            with QueryLengths(sizes), query_chunked_attention(4):  # the chunks' SDPA calls
                out_c, tangent_c = torch.func.jvp(attention, (q, k, v), tangents)
        torch.testing.assert_close(out_c, out, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(tangent_c, tangent, rtol=1e-13, atol=1e-14)
    assert sizes == [4, 4, 3] * 3
    assert torch.nn.functional.scaled_dot_product_attention is SDPA  # restored
    with pytest.raises(ValueError, match="chunk"), query_chunked_attention(0):
        pass


@pytest.mark.parametrize("backbone", ["sd3", "sit"])
def test_vggflow_exact_jvp_attention_chunks_change_nothing(backbone, monkeypatch):
    """VGG-Flow 'exact' with the JVPs' attention in chunks of 5 query rows (the tiny models have more tokens) gives
    the loss and gradients of unchunked attention (measured: SD3 bitwise, SiT 1.9e-8 relative)."""
    import flowkern.methods.vggflow as vggflow_module

    def run(chunk):
        monkeypatch.setattr(vggflow_module, "JVP_ATTENTION_CHUNK", chunk)
        model, cond, reward, _, value_net = _backbone(backbone)
        velocity, base_velocity = flow_callables(model)
        method = VGGFlow(
            velocity, base_velocity, reward, value_net=value_net, beta=10.0, alpha=3.0, consistency="exact",
            subsample_fraction=None, tau0=0.05,
        )  # fmt: skip
        batch = method.rollout(randn(2, *SAMPLE_SHAPE, seed=6), uniform_grid(4), cond)
        with QueryLengths(sizes):
            loss, _ = method.loss(batch)
        loss.backward()
        params = model.trainable_parameters() + list(method.value_parameters())
        return loss.detach(), torch.cat([p.grad.flatten() for p in params if p.grad is not None])

    sizes = []
    loss, grads = run(10**9)
    assert min(sizes) > 5
    loss_c, grads_c = run(5)
    assert min(sizes) <= 5  # the JVPs' calls ran in chunks
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=0)
    assert float((grads_c - grads).norm() / grads.norm()) < 1e-6


def test_reward_hvp_defaults_and_flag():
    """'central' for the pipelines, 'autograd' (exact) for the tiny model and the toy; a bad value names the flag."""
    from flowkern.app.build import default_reward_hvp
    from flowkern.methods.registry import MethodSettings

    assert [default_reward_hvp(k) for k in ("sd3", "flux", "flux2", "sit")] == ["central"] * 4
    assert default_reward_hvp("tiny") == default_reward_hvp("toy") == "autograd"
    with pytest.raises(ValueError, match=r"^--reward-hvp must be 'autograd' or 'central', got 'fd'$"):
        MethodSettings(reward_hvp="fd").check(4)
    from flowkern.app.run import TrainOptions
    from flowkern.cli import _build_parser

    args = _build_parser().parse_args(["train", "--method", "vggflow", "--reward-hvp", "autograd"])
    assert TrainOptions(reward_hvp=args.reward_hvp).method_settings().reward_hvp == "autograd"
    assert TrainOptions().method_settings().reward_hvp is None  # the model kind's default (method_for_run)


# ---------------------------------------------------------------- LoRA: one fp32 copy of each input
def test_bf16_lora_casts_each_input_once():
    """peft casts the bf16 input of to_q, to_k and to_v to fp32 separately and autograd saves each copy; shared,
    one copy is saved (exactly 2 fp32 copies less per attention), the output is bitwise the same."""
    model = SD3FlowModel(tiny_sd3_transformer(seed=0, dtype=torch.bfloat16))
    model.add_lora(4)
    text, pooled = sd3_conditioning(2, seed=1)
    cond = SD3Conditioning(text, pooled)
    x, t = randn(2, 4, 16, 16, seed=2), torch.tensor(0.4)
    inputs = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
        for name, m in model.transformer.named_modules()
        if name.endswith("attn.to_q")
    ]
    shared = saved_bytes(lambda: model.velocity(x, t, cond))
    for h in hooks:
        h.remove()
    v_shared = model.velocity(x, t, cond)
    (g_shared,) = torch.autograd.grad(v_shared.square().sum(), model.trainable_parameters()[:1])
    layers = [m for m in model.transformer.modules() if "_cast_input_dtype" in vars(m)]
    assert len(layers) == 4 * len(inputs)  # to_q, to_k, to_v, to_out.0 of every attention
    for m in layers:
        del m._cast_input_dtype  # peft's own cast again
    unshared = saved_bytes(lambda: model.velocity(x, t, cond))
    v_plain = model.velocity(x, t, cond)
    (g_plain,) = torch.autograd.grad(v_plain.square().sum(), model.trainable_parameters()[:1])
    assert all(i.dtype == torch.bfloat16 for i in inputs)
    assert unshared - shared == sum(2 * i.numel() * 4 for i in inputs)
    torch.testing.assert_close(v_shared, v_plain, rtol=0, atol=0)
    torch.testing.assert_close(g_shared, g_plain, rtol=2e-2, atol=1e-5)  # bf16 state path: rounding only


# ---------------------------------------------------------------- exact CPU peaks
class ConvVelocity(nn.Module):
    """v(x, t): three 3x3 convolutions on (x, t) [B, C, H, W]; few parameters, activations ~ 40x the state (the
    regime of image models, where the graph, not the weights, sets the peak)."""

    def __init__(self, channels: int, hidden: int = 32, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(channels + 1, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1),
                nn.SiLU(), nn.Conv2d(hidden, channels, 3, padding=1),
            )  # fmt: skip

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.net(torch.cat([x, t], dim=1))


class _ConvFlows:
    """v_base: a frozen ConvVelocity; v_theta = v_base + a trainable one; a quadratic reward."""

    def __init__(self, shape=(4, 16, 16)):
        base = ConvVelocity(shape[0], seed=0).requires_grad_(False)
        self.model = ResidualFlowModel(base, ConvVelocity(shape[0], seed=1))
        self.shape = shape
        self.reward = lambda x: -(x - 0.5).square().flatten(1).sum(1)

    def batch(self, method, n_traj: int, n_steps: int):
        return method.rollout(randn(n_traj, *self.shape, seed=3), uniform_grid(n_steps), None)

    def peak(self, method, batch) -> int:
        for p in self.model.trainable_parameters() + method.value_parameters():
            p.grad = torch.zeros_like(p)  # as after zero_grad(set_to_none=False): not counted in the peak

        def run():
            loss, _ = method.loss(batch)
            loss.backward()

        return peak_memory(run)


def test_dam_peak_is_flat_in_K():
    """micro_batch = 1: peak(K) - peak(1) is the K - 1 extra adjoint states only; one batch (micro_batch None) also
    keeps K B graphs of v_theta."""
    flows = _ConvFlows()
    n_traj, n_steps = 4, 8
    state_bytes = n_traj * math.prod(flows.shape) * 4
    v, vb = flow_callables(flows.model)
    peaks = {}
    for mb in (1, None):
        for K in (1, 8):
            method = AdjointMatching(v, vb, flows.reward, beta=1.0, K=K, micro_batch=mb)
            peaks[mb, K] = flows.peak(method, flows.batch(method, n_traj, n_steps))
    assert peaks[1, 8] - peaks[1, 1] <= 7 * state_bytes + 0.05 * peaks[1, 1], peaks
    assert peaks[None, 8] - peaks[None, 1] > 2 * (peaks[1, 8] - peaks[1, 1]) + 7 * state_bytes, peaks


def test_vggflow_peak_is_flat_in_the_number_of_transitions():
    """micro_batch = 2: 4 or 32 transitions per trajectory, the same peak up to per-transition scalars (norms,
    indices); one batch grows with every transition's graphs and reward gradients."""
    flows = _ConvFlows()
    v, vb = flow_callables(flows.model)
    peaks = {}
    for mb in (2, None):
        for n_steps in (4, 32):
            method = VGGFlow(
                v, vb, flows.reward, value_net="small", sample_shape=flows.shape, beta=10.0, subsample_fraction=None,
                micro_batch=mb,
            )  # fmt: skip
            peaks[mb, n_steps] = flows.peak(method, flows.batch(method, 4, n_steps))
    transitions = 4 * 32
    assert peaks[2, 32] - peaks[2, 4] <= 64 * transitions + 0.02 * peaks[2, 4], peaks
    assert peaks[None, 32] - peaks[None, 4] > 10 * (peaks[2, 32] - peaks[2, 4]) + 0.5 * peaks[2, 4], peaks


# ---------------------------------------------------------------- Trainer: x_N decoded once; accumulation
def _toy_trainer(micro_batch, grad_accum=1, calls=None):
    flows = _ConvFlows()

    def reward(x):
        if calls is not None:
            calls.append(x.shape[0])
        return flows.reward(x)

    v, vb = flow_callables(flows.model)
    method = AdjointMatching(v, vb, reward, beta=1.0, K=2, micro_batch=micro_batch)
    config = TrainConfig(batch_size=4, grad_accum_steps=grad_accum, num_steps=4, lr=1e-3, residual_probe=0)
    return Trainer(flows.model, reward, method, config, sample_shape=flows.shape), flows


@pytest.mark.parametrize("micro_batch", [None, 3])
def test_dam_decodes_x_N_once_per_update(micro_batch):
    calls = []
    trainer, _ = _toy_trainer(micro_batch, calls=calls)
    metrics = trainer.train_step()
    assert calls == ([4] if micro_batch is None else [3, 1])  # one r(x_N) with its gradient, nothing else
    assert metrics["reward_mean"] == pytest.approx(metrics["rollout_reward"], rel=1e-12)


def test_micro_batched_update_with_gradient_accumulation_equals_one_batch():
    """Trainer (grad_accum 2: loss / 2 backpropagated twice) with micro-batched DAM = the same update in one batch."""
    grads = []
    for mb in (None, 1):
        trainer, flows = _toy_trainer(mb, grad_accum=2)
        step = trainer.optimizer_step
        params = flows.model.trainable_parameters()
        trainer.optimizer_step = lambda norms, step=step, params=params: (
            grads.append([p.grad.clone() for p in params]),
            step(norms),
        )
        trainer.train_step()
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_bad_micro_batch_is_a_clear_error():
    f = lambda x, t, c=None: x
    for bad, err in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="micro_batch"):
            AdjointMatching(f, f, lambda x: x.sum(1), beta=1.0, micro_batch=bad)
        with pytest.raises(err, match="micro_batch"):
            VGGFlow(f, f, lambda x: x.sum(1), value_net=f, beta=1.0, micro_batch=bad)


def test_real_pipeline_memory_defaults():
    """The CLI's defaults for pipelines: micro_batch 1, checkpointing of transformer and VAE (the LoRA-safe
    function); the tiny model and the toy keep one batch."""
    from flowkern.app.build import default_micro_batch, memory_defaults

    assert [default_micro_batch(k) for k in ("sd3", "flux", "sit", "tiny", "toy")] == [1, 1, 1, None, None]
    model = SD3FlowModel(tiny_sd3_transformer(seed=0))
    model.add_lora(4)
    decoder = LatentDecoder(tiny_vae("kl", seed=0))
    memory_defaults(model, decoder)
    assert model.transformer.gradient_checkpointing
    assert model.transformer._gradient_checkpointing_func == model.checkpoint_block
    assert decoder.gradient_checkpointing  # per decoder layer
