"""Quantized frozen base weights (flowkern.models.quantize, issue 17) on tiny SD3, FLUX.1 and FLUX.2 transformers.

The base's linears are stored weight-only in int8 or fp8 (torchao) under an fp32 LoRA: the velocity stays within a
measured quantization error of the unquantized model; the adjoint engine is exact against unrolled autograd on the
quantized model itself; a training step changes only the LoRA; the LoRA file loads into a stock bf16 pipeline; the
planner's byte prediction equals the bytes stored. Bad input gets one line.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("torchao", reason="torchao is not installed (pip install 'flowkern[quant]'): quantized-base tests")

from flowkern.adjoint import lean_adjoint, truncated_backprop  # noqa: E402
from flowkern.models import quantize as Q  # noqa: E402
from flowkern.models.flux import FluxConditioning, FluxFlowModel  # noqa: E402
from flowkern.models.flux2 import Flux2Conditioning, Flux2FlowModel  # noqa: E402
from flowkern.models.sd3 import SD3Conditioning, SD3FlowModel  # noqa: E402
from flowkern.sampling import sd3_shifted_grid  # noqa: E402
from tests.models_tiny import sd3_conditioning, tiny_sd3_transformer  # noqa: E402
from tests.models_tiny_backbones import (  # noqa: E402
    randn,
    randomize_lora,
    tiny_flux2_transformer,
    tiny_flux_transformer,
)
from tests.test_adjoint import assert_rel, grads_of, unrolled  # noqa: E402
from tests.test_flux2_adapter import _one_thread  # noqa: E402, F401  (autouse: one CPU thread per test)

KINDS = ("sd3", "flux", "flux2")
QUANTIZED = ("int8", "fp8")
# relative L2 error of the CFG velocity against the fp32 model, measured (bf16 compute, seed 0; `pytest -s -k within`):
# bf16 0.018 / 0.031 / 0.006, int8 0.020 / 0.033 / 0.009, fp8 0.032 / 0.044 / 0.036 for SD3 / FLUX.1 / FLUX.2. Bounds:
# int8 rounds to 1/127 of each row's absmax, fp8 e4m3 keeps 3 mantissa bits (up to 2^-4 relative); with margin.
BOUND = {"bf16": 0.05, "int8": 0.05, "fp8": 0.08}


def build(kind: str, dtype: torch.dtype = torch.bfloat16, precision: str = "bf16"):
    """(adapter with its base in ``precision``, a state x, conditioning with CFG) for a tiny ``kind`` backbone."""
    if kind == "sd3":
        model = SD3FlowModel(tiny_sd3_transformer(dtype=dtype))
        text, pooled = sd3_conditioning(2)
        cond = SD3Conditioning(text, pooled, 0.5 * text, 0.5 * pooled, guidance_scale=3.0)
        x = randn(2, 4, 16, 16, seed=5)
    elif kind == "flux":
        model = FluxFlowModel(tiny_flux_transformer(dtype=dtype))
        text, pooled = randn(2, 6, 32, seed=1), randn(2, 32, seed=2)
        x, cond = randn(2, 4, 8, 8, seed=5), FluxConditioning(text, pooled, 3.5, 0.5 * text, pooled, guidance_scale=2.0)
    else:
        model = Flux2FlowModel(tiny_flux2_transformer(dtype=dtype))
        text = randn(2, 6, 32, seed=1)
        x, cond = randn(2, 16, 4, 4, seed=5), Flux2Conditioning(text, 4.0, 0.5 * text, guidance_scale=2.0)
    Q.quantize_base(model.transformer, precision)
    return model, x, cond


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("precision", ["bf16", *QUANTIZED])
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_velocity_within_measured_error(kind, precision):
    ref, x, cond = build(kind, torch.float32)
    model, _, _ = build(kind, precision=precision)
    with torch.no_grad():
        v_ref, v = ref.velocity(x, torch.tensor(0.4), cond), model.velocity(x, torch.tensor(0.4), cond)
    err = _relative(v, v_ref)
    print(f"{kind} {precision}: relative velocity error vs fp32 {err:.4f}")
    assert v.dtype == x.dtype and torch.isfinite(v).all()
    assert err <= BOUND[precision], err
    if precision != "bf16":
        assert model.base_precision == precision and len(Q.quantized_layers(model.transformer)) > 0
        bf16, _, _ = build(kind)
        assert not torch.equal(v, bf16.velocity(x, torch.tensor(0.4), cond).detach())  # the weights really changed


@pytest.mark.parametrize("precision", QUANTIZED)
def test_quantized_matmul_is_the_dequantized_weight(precision):
    """The mechanism exactly: an fp32 model whose linears hold dequant(q) gives the quantized model's velocity."""
    model, x, cond = build("flux2", torch.float32, precision)
    plain, _, _ = build("flux2", torch.float32)
    layers = dict(model.transformer.named_modules())
    with torch.no_grad():
        for name, sub in plain.transformer.named_modules():
            if isinstance(sub, torch.nn.Linear):
                sub.weight.copy_(layers[name].weight.dequantize())
        torch.testing.assert_close(model.velocity(x, 0.4, cond), plain.velocity(x, 0.4, cond), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_weight_bytes_prediction_and_lora_on_one_copy(kind):
    """quantized_weight_bytes (shapes only) equals the bytes stored; the LoRA wraps the quantized linears (peft's
    TorchaoLoraLinear), the base velocity reads the same tensors, and VGG-Flow's value-net copy shares them."""
    from peft.tuners.lora import LoraLayer

    from flowkern.models.value_net import TransformerValueNet

    bf16, x, cond = build(kind)
    for precision in QUANTIZED:
        model, _, _ = build(kind, precision=precision)
        stored = Q.weight_bytes(model.transformer)
        print(f"{kind}: frozen weight bytes bf16 {Q.weight_bytes(bf16.transformer)}, {precision} {stored}")
        assert Q.quantized_weight_bytes(bf16.transformer, precision) == stored
        assert Q.quantized_weight_bytes(model.transformer, precision) == stored
        assert stored < 0.65 * Q.weight_bytes(bf16.transformer)
        with torch.no_grad():
            before = model.velocity(x, 0.3, cond)
        model.add_lora(4)
        randomize_lora(model.transformer)
        wrapped = [m for m in model.transformer.modules() if isinstance(m, LoraLayer)]
        assert wrapped and all(Q._is_quantized(m.get_base_layer().weight) for m in wrapped)
        assert Q.weight_bytes(model.transformer) == stored  # no second copy of the base
        with torch.no_grad():
            tuned = model.velocity(x, 0.3, cond)
            with model.base_velocity():
                base = model.velocity(x, 0.3, cond)
        assert torch.equal(base, before) and not torch.equal(tuned, base)
        value = TransformerValueNet(model, rank=2)
        ours = {n: p for n, p in model.transformer.named_parameters() if "lora_" not in n}
        for copy in (value.flow.transformer, value.base_flow.transformer):
            shared = {n.replace(".base_layer", ""): p for n, p in copy.named_parameters() if "lora_" not in n}
            ours_flat = {n.replace(".base_layer", ""): p for n, p in ours.items()}
            assert shared.keys() == ours_flat.keys() and all(shared[n] is ours_flat[n] for n in shared)
    with torch.device("meta"):  # the planner's use: a meta module, nothing materialised
        meta = type(bf16.transformer).from_config(bf16.transformer.config)
    assert Q.quantized_weight_bytes(meta, "int8") == Q.quantized_weight_bytes(bf16.transformer, "int8")


def _unrolled_setup(kind: str, precision: str):
    """An fp32-compute model with a ``precision`` base and a random LoRA; velocity callables bound to a cond."""
    model, x, cond = build(kind, torch.float32, precision)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.add_lora(2)
    randomize_lora(model.transformer)
    velocity = lambda xx, t: model.velocity(xx, t, cond, detach_uncond=True)  # noqa: E731
    return model, x, cond, velocity


@pytest.mark.parametrize("precision", QUANTIZED)
@pytest.mark.parametrize("kind", KINDS)
def test_adjoint_engine_exact_on_the_quantized_model(kind, precision):
    """Truncated backprop (M23) and the lean adjoint (M25) against plain autograd through the same quantized model."""
    model, x0, cond, velocity = _unrolled_setup(kind, precision)
    params, n, k = model.trainable_parameters(), 4, 2
    ts = sd3_shifted_grid(n)
    a_n = randn(*x0.shape, seed=11)
    states, ref_adjoints = unrolled(velocity, x0, ts, k, a_n)
    ref_grads = grads_of(params)
    a = truncated_backprop(velocity, states, ts, a_n, k)
    assert_rel(a, ref_adjoints[0], 1e-5, "a_{N-K}")
    for g, r in zip(grads_of(params), ref_grads):
        assert_rel(g, r, 1e-5, "LoRA gradient")
    assert any(r.abs().max() > 0 for r in ref_grads)

    def base(xx, t):
        with model.base_velocity():
            return model.velocity(xx, t, cond)

    states, ref = unrolled(base, x0, ts, n, a_n)
    for p in params:
        p.grad = None
    lean = lean_adjoint(base, states, ts, a_n, k)
    for j, (got, want) in enumerate(zip(lean, ref[n - k :])):
        assert_rel(got, want, 1e-5, f"lean a~_(N-K+{j})")
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("precision", QUANTIZED)
def test_jvp_through_the_quantized_base(precision):
    """'exact' consistency's forward-mode JVP (M21) passes the quantized linears: it matches central differences."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, x, cond, _ = _unrolled_setup("flux2", precision)
    Q.check_jvp(model.transformer)
    w = randn(*x.shape, seed=7)
    f = lambda xx: model.velocity(xx, torch.tensor(0.4), cond)  # noqa: E731
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        _, jv = torch.func.jvp(f, (x,), (w,))
        fd = (f(x + 1e-3 * w) - f(x - 1e-3 * w)) / 2e-3
    assert _relative(jv, fd) < 1e-3


@pytest.mark.parametrize("precision", QUANTIZED)
def test_update_changes_only_the_lora(precision):
    model, x, cond, velocity = _unrolled_setup("flux", precision)
    frozen = {n: p.dequantize().clone() if Q._is_quantized(p) else p.clone() for n, p in model.named_parameters()}
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    velocity(x, torch.tensor([0.3, 0.7])).square().mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        now = p.dequantize() if Q._is_quantized(p) else p
        assert torch.equal(now, frozen[n]) != (n in lora), n
    assert lora and all("lora_" in n for n in lora)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_from_a_quantized_base_loads_into_a_stock_bf16_pipeline(kind, tmp_path):
    """A LoRA trained on an int8 base is an ordinary diffusers LoRA file: the stock pipeline's load_lora_weights takes
    it into the bf16 transformer unchanged (the same values), and the tuned velocity agrees within the int8 error."""
    import diffusers

    model, x, cond = build(kind, precision="int8")
    model.add_lora(4, 2.0)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=5e-2)
    for step in range(2):
        opt.zero_grad()
        model.velocity(x, torch.tensor([0.2, 0.6]) + 0.1 * step, cond).square().mean().backward()
        opt.step()
    model.save_lora(tmp_path / "lora")
    stock_transformer = build(kind)[0].transformer
    pipeline = getattr(
        diffusers, {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "flux2": "Flux2Pipeline"}[kind]
    )
    components = {name: None for name in pipeline._get_signature_keys(pipeline)[0]}  # no text encoders, no VAE
    components.update(transformer=stock_transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    pipe = pipeline(**components)
    pipe.load_lora_weights(tmp_path / "lora")
    strip = lambda module: {  # noqa: E731  (parameter name without the adapter's name: default / default_0)
        n.replace(".default_0.", ".").replace(".default.", "."): p for n, p in module.named_parameters() if "lora_" in n
    }
    ours, theirs = strip(model.transformer), strip(pipe.transformer)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(theirs[n].float(), ours[n].to(theirs[n].dtype).float()) for n in ours)
    stock = type(model)(pipe.transformer)
    with torch.no_grad():
        v_ours, v_stock = model.velocity(x, 0.5, cond), stock.velocity(x, 0.5, cond)
        with stock.base_velocity():
            v_stock_base = stock.velocity(x, 0.5, cond)
    assert _relative(v_ours, v_stock) <= BOUND["int8"]
    assert _relative(v_stock, v_stock_base) > 2 * _relative(v_ours, v_stock)  # the LoRA's effect exceeds the error


# ---------------------------------------------------------------- bad input: one line each
def test_bad_input(monkeypatch):
    model, _, _ = build("flux2")
    with pytest.raises(ValueError, match="base_precision must be one of bf16, int8, fp8"):
        Q.quantize_base(model.transformer, "int4")
    Q.quantize_base(model.transformer, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize_base(model.transformer, "fp8")
    with pytest.raises(ValueError, match="has no nn.Linear"):
        Q.quantize_base(torch.nn.LayerNorm(4), "int8")
    with pytest.raises(ValueError, match="frozen weights only"):
        Q.quantize_base(torch.nn.Linear(4, 4), "int8")

    # exact consistency where torchao has no JVP rule: one line suggesting fd
    def no_jvp(layer):
        raise NotImplementedError("Trying to use forward AD with an op that does not support it")

    monkeypatch.setattr(Q, "_linear_jvp", no_jvp)
    with pytest.raises(ValueError, match=r"'exact' consistency needs a JVP through the int8 base.*--consistency fd"):
        Q.check_jvp(model.transformer)

    # fp8 where the device or torch cannot serve it
    import torchao.quantization as tq

    def refuse(*args, **kwargs):
        raise RuntimeError("float8 types are not supported on this device\nmore detail")

    monkeypatch.setattr(tq, "quantize_", refuse)
    with pytest.raises(ValueError, match=r"fp8 base is not supported on cpu here \(float8 types .*\): use .*int8$"):
        Q.check_fp8("cpu")
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match="needs torch with float8_e4m3fn.*use int8"):
        Q.check_fp8("cpu")


def test_torchao_missing_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    Q._torchao.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"needs torchao.*pip install 'flowkern\[quant\]'"):
            Q.quantize_base(torch.nn.Linear(4, 4).requires_grad_(False), "int8")
    finally:
        Q._torchao.cache_clear()


def test_from_pretrained_base_precision(tmp_path):
    tiny_flux2_transformer().save_pretrained(tmp_path / "transformer")
    model = Flux2FlowModel.from_pretrained(tmp_path, local_files_only=True, base_precision="fp8", lora_rank=2)
    assert model.base_precision == "fp8" and model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    bf16 = Flux2FlowModel.from_pretrained(tmp_path, local_files_only=True, base_precision="bf16")
    assert bf16.base_precision == "bf16"
    with pytest.raises(ValueError, match="base_precision='bf16' loads bf16 weights"):
        Flux2FlowModel.from_pretrained(tmp_path, base_precision="bf16", torch_dtype=torch.float32)


# ---------------------------------------------------------------- the CLI: --base-precision
def _train(capsys, out, *extra):
    from tests.test_cli import run

    args = ["train", "--model", "tiny", "--reward", "brightness", "--num-steps", "2", "--batch-size", "2",
            "--lora-rank", "2", "--eval-samples", "2", "--checkpoint-every", "1", "--no-progress",
            "--out", out]  # fmt: skip
    rc, stdout, err = run(capsys, *args, *extra)
    assert rc == 0, err
    return stdout


def test_cli_int8_base_resumes_bit_exactly(tmp_path, capsys):
    """--base-precision int8 (DAM, K=1) on the built-in tiny model: 2 updates straight equal 1 + resume 1, bitwise."""
    from safetensors.torch import load_file

    common = ["--base-precision", "int8", "--method", "dam", "--K", "1"]
    _train(capsys, tmp_path / "straight", *common, "--steps", "2")
    _train(capsys, tmp_path / "split", *common, "--steps", "1")
    assert "resumed" in _train(capsys, tmp_path / "split", *common, "--steps", "2", "--resume")
    a, b = (load_file(tmp_path / d / "lora" / "pytorch_lora_weights.safetensors") for d in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = __import__("json").loads((tmp_path / "straight" / "run_config.json").read_text())
    assert saved["base_precision"] == "int8"


def test_cli_fp8_base_vggflow_exact_consistency(tmp_path, capsys):
    """VGG-Flow on an fp8 base of an SD3 pipeline directory: bf16 compute picks 'exact' consistency, whose JVP runs
    through the fp8 linears (and the VAE decode the reward reads)."""
    import json

    from tests.test_cli import run
    from tests.test_sd3_adapter import _tiny_pipeline

    _tiny_pipeline().save_pretrained(tmp_path / "pipe")
    capsys.readouterr()
    out = tmp_path / "run"
    rc, _, err = run(
        capsys, "train", "--model", tmp_path / "pipe", "--reward", "brightness", "--num-steps", "2", "--no-progress",
        "--prompt", "a cat", "--method", "vggflow", "--steps", "1", "--batch-size", "2", "--lora-rank", "2",
        "--eval-samples", "2", "--base-precision", "fp8", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["skipped"] == 0 and torch.isfinite(torch.tensor(log[0]["loss"]))
    assert json.loads((out / "run_config.json").read_text())["base_precision"] == "fp8"
