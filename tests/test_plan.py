"""The memory planner (flowkern plan, issue 16) against exact CPU peaks on tiny backbones, and its bad input.

Each check builds the same run twice with ``flowkern.app.plan_models.build_run``: once for real (random weights)
and measured by the profiler's allocator events (``peak_memory``), once under fake tensors and traced by the
planner in its CPU mode. The prediction must be within 5% of the measured peak of the update.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from flowkern.ops.backend import use_backend
from tests.models_tiny import SD3_TINY
from tests.models_tiny_backbones import DIT_TINY, FLUX2_TINY, FLUX_TINY, VAE_FLUX2_TINY, VAE_KL_TINY
from tests.utils import peak_memory

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flowkern.app import plan as planner  # noqa: E402
from flowkern.app.plan_models import Knobs, ModelSpec, build_run  # noqa: E402

TINY = {
    "sd3": ModelSpec("tiny-sd3", "sd3", SD3_TINY, VAE_KL_TINY, text_tokens=8, pooled_dim=32, guidance_scale=2.0,
                     resolution=32, num_steps=3),
    "flux": ModelSpec("tiny-flux", "flux", FLUX_TINY, VAE_KL_TINY, text_tokens=8, pooled_dim=32, guidance=3.5,
                      resolution=32, num_steps=3),
    "flux2": ModelSpec("tiny-flux2", "flux2", FLUX2_TINY, VAE_FLUX2_TINY, vae_class="AutoencoderKLFlux2",
                       text_tokens=8, guidance=3.5, resolution=32, num_steps=3),
    "sit": ModelSpec("tiny-sit", "sit", DIT_TINY, VAE_KL_TINY, guidance_scale=2.0, resolution=16, num_steps=3),
}  # fmt: skip
METHODS = {
    "vggflow-fd": dict(method="vggflow", consistency="fd"),
    "vggflow-exact": dict(method="vggflow", consistency="exact"),
    "dam": dict(method="dam", K=2),
    "am": dict(method="am"),
    "draft": dict(method="draft", K=2),
    "refl": dict(method="refl", K=2),
}


@pytest.fixture(autouse=True)
def _one_thread_torch_ops():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with use_backend("torch"):
        yield
    torch.set_num_threads(threads)


def _knobs(method: str) -> dict:
    return dict(precision="fp32", batch=2, lora_rank=4, micro_batch=1, **METHODS[method])


# CI runs one case per backbone and per method (VGG-Flow exact on SiT, the cheapest: torch.func.jvp's zero tangents);
# FLOWKERN_PLAN_MATRIX=1 runs all 24 (~10 min on 2 idle cores: the trace costs ~0.3 ms of fake-tensor dispatch an
# op, a VGG-Flow update is ~60k ops)
CI_CASES = {("sd3", "refl"), ("flux", "draft"), ("flux2", "dam"), ("sit", "am"), ("sit", "vggflow-fd"),
            ("sit", "vggflow-exact")}  # fmt: skip
MATRIX = os.environ.get("FLOWKERN_PLAN_MATRIX") == "1"
KNOWN_GAPS: dict[tuple[str, str], str] = {}  # (backbone, method) -> why it is off by more than 5% (none today)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("backbone", list(TINY))
def test_cpu_prediction_within_5_percent_of_the_exact_peak(backbone, method):
    if not MATRIX and (backbone, method) not in CI_CASES:
        pytest.skip("one case per backbone and per method in CI; FLOWKERN_PLAN_MATRIX=1 runs all 24")
    spec, knobs = TINY[backbone], _knobs(method)
    trainer, _ = build_run(spec, Knobs(**knobs))
    with planner.no_cyclic_gc():  # as the planner traces: no collection inside the update
        measured = peak_memory(trainer.train_step)
    assert not trainer.skipped, trainer.skipped
    predicted = planner.plan(spec, device="cpu", **knobs)
    update = predicted["update"]
    assert not update["skipped"]
    error = (update["peak_bytes"] - measured) / measured
    print(f"{backbone} {method}: predicted {update['peak_bytes']} measured {measured} ({100 * error:+.2f}%)")
    if (backbone, method) in KNOWN_GAPS and abs(error) > 0.05:
        pytest.xfail(f"{KNOWN_GAPS[backbone, method]}: {100 * error:+.1f}%")
    assert abs(error) <= 0.05, (backbone, method, update["peak_bytes"], measured, f"{100 * error:.1f}%")
    assert sum(update["kinds"].values()) == update["peak_bytes"]
    assert max(update["phases"].values()) == update["peak_bytes"]


def test_gpu_mode_models_flash_attention_rounding_and_workspace():
    spec, knobs = TINY["sd3"], _knobs("dam")
    cpu = planner.plan(spec, device="cpu", **knobs)
    gpu = planner.plan(spec, device="cuda", **knobs)
    assert gpu["device"] == "cuda" and gpu["cuda_context_bytes"] == planner.CUDA_CONTEXT_BYTES
    # the cuBLAS workspace is held from the first GEMM; every block is a multiple of 512 bytes
    assert gpu["update"]["peak_bytes"] >= planner.CUBLAS_WORKSPACE_BYTES
    assert (gpu["update"]["peak_bytes"] - planner.CUBLAS_WORKSPACE_BYTES) % 512 == 0
    assert gpu["update"]["peak_bytes"] - planner.CUBLAS_WORKSPACE_BYTES >= cpu["update"]["peak_bytes"] * 0.5
    assert gpu["reserved_bytes"] >= gpu["total_bytes"]
    json.dumps(gpu)  # JSON-able, for the GPU check script


def test_gpu_attention_keeps_no_l_by_l_matrix():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), planner.gpu_attention():
        q = torch.empty(1, 2, 4096, 64, dtype=torch.bfloat16, requires_grad=True)  # fake CPU, as the planner
        tracker = planner.StorageTracker(planner.cuda_block_bytes)
        with tracker:
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    # output + logsumexp (fp32 [B, H, L]) only: far below one L x L score matrix (2 x 4096^2 x 2 bytes = 64 MiB)
    assert tracker.peak <= out.numel() * 2 + 2 * 4096 * 4 + 4096
    assert tracker.peak < 2 * 4096 * 4096 * 2 / 10


def test_gpu_attention_honours_the_math_backend_under_forward_ad():
    """VGG-Flow exact asks for sdpa_kernel(MATH) around torch.func.jvp: the fused kernels have no JVP rule, so on a
    GPU the math kernel runs there, with its L x L scores (fp32 for bf16 inputs on CUDA); elsewhere flash."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    L = 1024
    scores = 2 * L * L * 4  # [B=1, H=2, L, L] fp32
    with FakeTensorMode(), planner.gpu_attention():
        q = torch.empty(1, 2, L, 64, dtype=torch.bfloat16)
        sdpa = lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x)
        math_tracker, flash_tracker = planner.StorageTracker(), planner.StorageTracker()
        with math_tracker, sdpa_kernel(SDPBackend.MATH):
            out, tangent = torch.func.jvp(sdpa, (q,), (torch.ones_like(q),))
        with flash_tracker:
            flash = sdpa(q.detach().requires_grad_(True))
    assert out.shape == tangent.shape == flash.shape == q.shape and out.dtype == torch.bfloat16
    assert math_tracker.peak >= scores
    assert flash_tracker.peak < scores / 10


def test_gpu_mode_plans_vggflow_exact_without_a_forward_ad_error():
    """Regression: `flowkern plan` (GPU mode) of VGG-Flow exact raised NotImplementedError (forward AD through the
    memory-efficient / flash kernels)."""
    spec = TINY["sit"]
    knobs = dict(_knobs("vggflow-exact"), batch=1)
    gpu = planner.plan(spec, device="cuda", **knobs)
    assert not gpu["update"]["skipped"]
    assert gpu["update"]["phases"]["loss_backward"] > 0


@pytest.mark.parametrize("backbone", ["sit", "flux"])
def test_extrapolation_in_blocks_equals_the_full_trace(backbone):
    """Traces at 2 and 3 blocks of each type, extrapolated to 4 (FLUX.1: 4 double + 4 single), against the full
    trace of the 4-block model (GPU mode, DAM K=2): the peak, its kinds and the weights equal to the byte."""
    import dataclasses

    spec = TINY[backbone]
    deep = {key: 4 for key in planner.BLOCK_COUNTS[spec.kind]}
    spec = dataclasses.replace(spec, name=f"deep-{backbone}", transformer={**spec.transformer, **deep})
    knobs = dict(_knobs("dam"), batch=1)
    full = planner.plan(spec, device="cuda", extrapolate=False, **knobs)
    fitted = planner.plan(spec, device="cuda", **knobs)
    assert fitted["fit"]["depths"] == deep and "fit" not in full
    assert fitted["total_bytes"] == full["total_bytes"]
    assert fitted["resident"] == full["resident"]
    assert fitted["update"]["kinds"] == full["update"]["kinds"]
    assert fitted["update"]["peak_phase"] == full["update"]["peak_phase"]
    peak_phase = full["update"]["peak_phase"]
    assert fitted["update"]["phases"][peak_phase] == full["update"]["phases"][peak_phase]
    # the other phases' peaks within 0.1% (FLUX.1's 'other' phase: 1024 bytes lower; its peak moment moves)
    for phase, full_peak in full["update"]["phases"].items():
        assert abs(fitted["update"]["phases"][phase] - full_peak) <= 1e-3 * full_peak, phase


def test_cuda_allocator_rounding():
    assert planner.cuda_block_bytes(1) == 512
    assert planner.cuda_block_bytes(513) == 1024
    assert planner.cuda_block_bytes(0) == 0
    assert planner.cuda_segment_bytes(100) == 2 * 2**20
    assert planner.cuda_segment_bytes(5 * 2**20) == 20 * 2**20
    assert planner.cuda_segment_bytes(11 * 2**20) == 12 * 2**20


def test_named_configs_resolve_and_bad_input_names_the_argument():
    from flowkern.app.plan_models import load_named, named_models

    assert {"sd3-medium", "sd3.5-large", "flux1-dev", "flux2-klein-4b", "sit-xl-2"} <= set(named_models())
    assert load_named("sd3-medium").resolution_multiple == 16
    assert load_named("flux1-dev").resolution_multiple == 16
    assert load_named("flux2-klein-4b").resolution_multiple == 16
    with pytest.raises(ValueError, match="model: unknown config 'sd4'"):
        planner.plan("sd4")
    with pytest.raises(ValueError, match="resolution: must be a multiple of 16"):
        planner.plan("sd3-medium", resolution=1000)
    for bad in ("24XB", "lots", "", "-3GB"):
        with pytest.raises(ValueError, match="--memory-budget: expected"):
            planner.parse_budget(bad)
    with pytest.raises(ValueError, match="--memory-budget: .* below 1 GiB"):
        planner.parse_budget("100MB")
    assert planner.parse_budget("24GB") == 24 * 10**9
    assert planner.parse_budget("24GiB") == planner.parse_budget("24G") == 24 * 2**30


def test_budget_picks_the_fastest_setting_that_fits_or_names_the_smallest_budget(monkeypatch):
    # plan() itself is tested above; here its numbers are replaced to test the choice (bytes by setting)
    def fake_plan(model, device="cuda", **knobs):
        need = 30 if not knobs.get("checkpoint_backbone", True) else 20 if knobs.get("batch", 1) > 1 else 12
        return {"model": "m", "total_bytes": need * 2**30, "cuda_context_bytes": 0}

    monkeypatch.setattr(planner, "plan", fake_plan)
    chosen = planner.choose("sit-xl-2", "16GiB", method="dam", batch=4, K=3)
    assert chosen["choice"].startswith("batch 1 with 4 accumulation steps")
    assert [b // 2**30 for _, b in chosen["tried"]] == [30, 30, 20, 20, 20, 12]  # default, + offload, + sublayer
    assert planner.choose("sit-xl-2", "24GiB", method="dam", batch=4)["choice"].startswith("per-block checkpointing")
    assert planner.choose("sit-xl-2", "40GiB", method="dam")["choice"].startswith("no gradient checkpointing")
    with pytest.raises(ValueError, match=r"smallest budget that would is 12.0 GiB"):
        planner.choose("sit-xl-2", "8GiB", method="dam", batch=4)


def _fake_plans(weights: dict, update: dict, calls: list):
    """A plan() whose frozen weights depend on the base precision and whose update on the knobs (GiB)."""

    def fake_plan(model, device="cuda", **knobs):
        calls.append(knobs)
        bp = knobs.get("base_precision") or "bf16"
        u = update["offload"] if knobs.get("offload_trajectory") else update["default"]
        resident = {"transformer": weights[bp] * 2**30}
        return {"model": "m", "total_bytes": (weights[bp] + u) * 2**30, "resident": resident, "cuda_context_bytes": 0,
                "knobs": knobs}  # fmt: skip

    return fake_plan


def test_budget_search_tries_int8_then_fp8_bases_after_bf16(monkeypatch):
    # FLUX.1-dev-like: 22 GiB of bf16 weights, 11 in int8/fp8; the update needs 4 GiB (3 with the trajectory offloaded)
    calls = []
    monkeypatch.setattr(planner, "plan", _fake_plans({"bf16": 22, "int8": 11, "fp8": 11}, {"default": 4, "offload": 3},
                                                      calls))  # fmt: skip
    knobs = dict(method="vggflow", consistency="fd")
    cands = planner.candidate_knobs(knobs, ("int8", "fp8"), faster=False)
    assert [w for w, _ in cands][3:6] == [
        "int8 base: per-block checkpointing of the backbone, per-layer of the VAE and the reward tower (the default)",
        "int8 base: offload the stored trajectory to pinned CPU memory",
        "int8 base: recompute the backbone per sublayer (attention, MLP)",
    ]
    assert {k.get("base_precision") for _, k in cands} == {None, "int8", "fp8"}
    # one pass serves both budgets; bf16 is not planned past its first setting (its weights alone exceed both)
    big, small = planner.choose_each("sit-xl-2", [20 * 2**30, 14 * 2**30], candidates=cands, **knobs)
    assert [c.get("base_precision") for c in calls] == [None, "int8", "int8"]
    assert big["choice"].startswith("int8 base: per-block") and small["choice"].startswith("int8 base: offload")
    line = planner.knob_line(small["prediction"]["knobs"])
    assert line.endswith("trajectory offload on, batch 1 x 1 accumulation, K None, base int8")
    assert planner.knob_line({**knobs, "base_precision": "fp8"}).endswith(f"base fp8 ({planner.FP8_ASSUMES})")
    # nothing fits: one line naming the smallest need; the settings skipped for their weights are planned after the
    # pass where they might need less than the smallest planned (the quantized ones), the bf16 ones cannot
    calls.clear()
    (refused,) = planner.choose_each("sit-xl-2", [10 * 2**30], candidates=cands, **knobs)
    assert refused["choice"] is None and refused["needs_bytes"] == 14 * 2**30
    assert refused["error"].endswith("the smallest budget that would is 14.0 GiB")
    assert [c.get("base_precision") for c in calls] == [None, "int8", "fp8", "int8", "int8", "fp8", "fp8"]
    # an int8 run tries fp8 after it, an fp8 or fp32 run no quantized base
    assert {k["base_precision"] for _, k in planner.candidate_knobs({"base_precision": "int8"}, ("int8", "fp8"))} == {
        "int8", "fp8"}  # fmt: skip
    for own in ({"base_precision": "fp8"}, {"precision": "fp32"}):
        assert len(planner.candidate_knobs(own, ("int8", "fp8"))) == len(planner.candidate_knobs(own))


def test_quantized_bases_need_torchao(monkeypatch):
    import importlib.util

    assert planner.quantized_bases("flux1-dev", "cuda")[0] == "int8"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "torchao" else find_spec(name))
    assert planner.quantized_bases("flux1-dev", "cuda") == ()


def test_budget_search_plans_an_int8_base_on_a_tiny_flux():
    pytest.importorskip("torchao")
    knobs = dict(method="vggflow", consistency="fd", precision="bf16", batch=1, lora_rank=4)
    default, int8 = [c for c in planner.candidate_knobs(knobs, ("int8",), faster=False) if "(the default)" in c[0]]
    cache = {}

    def cached_plan(model, device="cuda", **k):
        key = repr(sorted(k.items()))
        cache[key] = cache.get(key) or planner.plan(model, device=device, **k)
        return cache[key]

    need_int8 = planner.fits(cached_plan(TINY["flux"], **int8[1]))
    chosen = planner.choose(TINY["flux"], need_int8, candidates=[default, int8], plan_fn=cached_plan, **knobs)
    assert len(cache) == 2 and chosen["tried"][0][1] > need_int8  # the bf16 base does not fit, the int8 base does
    assert chosen["choice"].startswith("int8 base") and chosen["prediction"]["knobs"]["base_precision"] == "int8"
    assert knobs["precision"] == "bf16" and planner.knob_line(chosen["prediction"]["knobs"]).endswith("base int8")


def test_reward_hvp_knob_plans_the_mode_it_names():
    knobs = dict(method="vggflow", consistency="exact", precision="bf16", batch=1, lora_rank=4)
    trainer, _ = build_run(TINY["flux"], Knobs(reward_hvp="autograd", **knobs))
    assert trainer.method.reward_hvp == "autograd"
    autograd, central = (planner.plan(TINY["flux"], reward_hvp=mode, **knobs) for mode in ("autograd", "central"))
    assert autograd["knobs"]["reward_hvp"] == "autograd" and central["knobs"]["reward_hvp"] == "central"
    # the double backward through the VAE decode and the reward holds more than two ordinary reward gradients
    assert autograd["update"]["peak_bytes"] > central["update"]["peak_bytes"]
    with pytest.raises(ValueError, match=r"^reward_hvp: expected autograd or central, got 'exact'$"):
        Knobs(reward_hvp="exact").check(TINY["flux"])


def test_cli_plan_bad_input_is_one_line(capsys, tmp_path):
    from flowkern.cli import main

    assert main(["plan", "sd4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model: unknown config 'sd4'" in err[0]
    assert main(["plan", "sd3-medium", "--memory-budget", "lots"]) == 2
    assert "--memory-budget" in capsys.readouterr().err
    assert main(["plan", "sd3-medium", "--resolution", "1000"]) == 2
    assert "resolution" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_quantized_base_counts_the_frozen_linears_as_flowkern_train_stores_them():
    from flowkern.models.quantize import quantized_weight_bytes, weight_bytes

    spec, knobs = TINY["sit"], dict(_knobs("refl"), K=1)
    trainer, resident = build_run(spec, Knobs(**{**knobs, "precision": "bf16"}))
    transformer = resident["transformer"]
    buffers = sum(b.numel() * b.element_size() for b in transformer.buffers())
    assert planner.frozen_weight_bytes(transformer) == weight_bytes(transformer) + buffers
    predicted = {p: planner.plan(spec, device="cpu", **{**knobs, "base_precision": p}) for p in ("bf16", "int8")}
    for precision, prediction in predicted.items():
        assert prediction["knobs"]["precision"] == "bf16"  # as flowkern train: the quantized base computes in bf16
        assert prediction["resident"]["transformer"] == quantized_weight_bytes(transformer, precision) + buffers
    assert predicted["int8"]["resident"]["transformer"] < 0.65 * predicted["bf16"]["resident"]["transformer"]
    with pytest.raises(ValueError, match="base_precision must be one of"):
        planner.plan(spec, device="cpu", **{**knobs, "base_precision": "int4"})


def test_gpu_check_rows_parse_as_plan_commands_and_read_its_prediction(monkeypatch):
    """scripts/gpu_check_updates.py --predict runs `flowkern plan` per update row and reads total_bytes."""
    from pathlib import Path

    from flowkern.cli import _build_parser

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import gpu_check_updates as updates

    for row in updates.update_rows():
        args = _build_parser().parse_args(["plan", *row.plan_args()])
        assert (args.model, args.method, args.resolution, args.json) == (row.model, row.method, row.resolution, True)
    assert updates._peak_from({"total_bytes": 3 * 2**30, "update": {"peak_bytes": 1}}) == 3 * 2**30
    assert updates._peak_from({"error": "x"}) is None


VIEWS = {
    "reshape": lambda t: t.reshape(2, 40, 72),
    "transpose": lambda t: t.t(),
    "slice": lambda t: t[:, 8:40],
    "two views": lambda t: t.reshape(2, 40, 72).transpose(1, 2),
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_a_view_written_in_place_is_traced_as_autograd_regenerates_it(view):
    """After an in-place op on a view, autograd regenerates the view's grad_fn: AsStridedBackward0 on real tensors,
    whose backward allocates a zero buffer spanning the base; on fake tensors it replays the view (ViewBackward0, no
    allocation), so the tracker hands the replayed node the real node's buffer (torchao's int8 linear: y += bias on
    its reshaped output). Exact against the profiler for views whose backward only views and for slices (whose
    replayed backward allocates that buffer itself), the bias added once and twice."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def build():
        torch.manual_seed(0)
        return torch.randn(80, 72, requires_grad=True), torch.randn(VIEWS[view](torch.empty(80, 72)).shape[-1])

    def update(x, bias):
        y = VIEWS[view](x + x)  # (no Python scalars: the CPU wraps them in small tensors that no op returns)
        y += bias
        y.mul_(bias)  # a second in-place op: regenerated again
        torch.autograd.grad(y, x, torch.ones_like(y))

    real = build()
    measured = peak_memory(lambda: update(*real))
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        x, bias = build()
    tracker = planner.StorageTracker(lambda n: n, None)
    with fake, tracker:
        update(x, bias)
    assert tracker.peak == measured


def test_a_view_has_the_strides_of_the_real_kernel():
    """A VAE attention block's output reshaped to [1, C, H, W] gets the C++ view's strides on fake tensors too, so
    GroupNorm's memory-format choice (a contiguous copy first, not channels-last kernels from there on) and every
    later kernel's temporaries are traced as they run: exact against the profiler, workspaces included."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def build():
        torch.manual_seed(0)
        norm, conv = torch.nn.GroupNorm(8, 64), torch.nn.Conv2d(64, 64, 3, padding=1)
        return norm.requires_grad_(False), conv.requires_grad_(False), torch.randn(1, 64, 16, 16)

    def block(norm, conv, x):
        h = x.flatten(2).transpose(1, 2).contiguous()  # attention's [B, HW, C] output (diffusers' Attention)
        h = h.transpose(-1, -2).reshape(x.shape)  # back to [B, C, H, W]: a view, channels-last-like strides
        return conv(norm(h + x)), h.stride()

    real = build()
    measured = peak_memory(lambda: block(*real))
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        modules = build()
    tracker = planner.StorageTracker(lambda n: n, None, cpu_workspaces=True)
    with fake, tracker:
        _, strides = block(*modules)
    assert strides == block(*real)[1]
    assert tracker.peak == measured


@pytest.mark.parametrize(("precision", "bias"), [("int8", False), ("fp8", False), ("fp8", True), ("int8", True)])
def test_quantized_linear_is_traced_as_torchao_allocates(precision, bias):
    """The planner traces torchao's own weight-only linears (build_run quantizes the fake base as flowkern train
    does): every temporary (int8: the bf16 cast of the weight; fp8: its fp32 upcast, the scaled fp32 copy and the
    bf16 result) and what autograd keeps for the input gradient (the bf16 dequantized weight) match the profiler's
    exact allocator peak, forward with and without grad and forward + input gradient."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flowkern.app.plan_models import fake_building
    from flowkern.models.quantize import quantize_base

    def build():
        torch.manual_seed(0)
        layer = torch.nn.Linear(96, 288, bias=bias, dtype=torch.bfloat16).requires_grad_(False)
        quantize_base(layer, precision)
        return layer, torch.randn(2, 40, 96, dtype=torch.bfloat16, requires_grad=True)

    def runs(layer, x):
        def no_grad():
            with torch.no_grad():
                layer(x)

        def input_grad():
            y = layer(x)
            torch.autograd.grad(y, x, torch.ones_like(y))

        return {"no_grad": no_grad, "forward": lambda: layer(x), "input_grad": input_grad}

    measured = {name: peak_memory(fn) for name, fn in runs(*build()).items()}
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_building(fake):
        layer, x = build()
    predicted = {}
    for name, fn in runs(layer, x).items():
        tracker = planner.StorageTracker(lambda n: n, None)
        with fake, tracker:
            fn()
        predicted[name] = tracker.peak
    assert predicted == measured
    dequantized = 96 * 288 * 2  # the bf16 weight each call makes (and the forward with grad keeps)
    assert measured["no_grad"] >= (dequantized if precision == "int8" else 5 * dequantized)


QUANTIZED_CASES = [(b, m, p) for b in ("sd3", "flux", "flux2") for m in ("dam", "vggflow-fd") for p in ("int8", "fp8")]


@pytest.mark.parametrize(("backbone", "method", "base_precision"), QUANTIZED_CASES)
def test_quantized_base_prediction_within_5_percent_of_the_exact_peak(backbone, method, base_precision):
    """A whole update on an int8/fp8 base (bf16 compute): torchao's linears and the fp32 LoRA terms added to their
    bf16 outputs traced as the CPU runs them. CI runs FLUX.2 DAM int8; FLOWKERN_PLAN_MATRIX=1 all 12."""
    if not MATRIX and (backbone, method, base_precision) != ("flux2", "dam", "int8"):
        pytest.skip("FLUX.2 DAM int8 in CI; FLOWKERN_PLAN_MATRIX=1 runs all 12")
    spec, knobs = TINY[backbone], dict(_knobs(method), base_precision=base_precision)
    trainer, _ = build_run(spec, Knobs(**knobs))
    with planner.no_cyclic_gc():
        measured = peak_memory(trainer.train_step)
    assert not trainer.skipped, trainer.skipped
    predicted = planner.plan(spec, device="cpu", **knobs)["update"]["peak_bytes"]
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def test_budget_search_stops_at_a_setting_it_cannot_plan(monkeypatch):
    def fake_plan(model, device="cuda", **knobs):  # bf16 fits 24 GiB; the extrapolation refuses the int8 base
        if knobs.get("base_precision") == "int8":
            raise RuntimeError("extrapolate: the peak moves between phases with depth")
        return {"model": "m", "total_bytes": 18 * 2**30, "resident": {"transformer": 16 * 2**30},
                "cuda_context_bytes": 0, "knobs": knobs}  # fmt: skip

    monkeypatch.setattr(planner, "plan", fake_plan)
    cands = planner.candidate_knobs({"method": "refl"}, ("int8",), faster=False)
    big, small = planner.choose_each("sit-xl-2", [24 * 2**30, 14 * 2**30], candidates=cands, method="refl")
    assert big["choice"].endswith("(the default)")
    assert small["unplanned"] and "could not plan 'int8 base" in small["error"]
    with pytest.raises(RuntimeError, match="the peak moves between phases"):
        planner.choose("sit-xl-2", 14 * 2**30, candidates=cands, method="refl")
