"""The memory knobs of issue 16 (item 2): the backbone's recompute granularity, reward-tower checkpointing and the
stored trajectory offloaded to pinned CPU memory. Each knob on tiny models: the exact CPU peak (the profiler's
allocator events) lower where it should be, loss and gradients bitwise equal with the knob on and off, the
planner's CPU-mode prediction within 5% of the exact peak; bad values give one ValueError naming the setting."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.utils import peak_memory

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flowkern.app import plan as planner  # noqa: E402
from flowkern.app import plan_models  # noqa: E402
from flowkern.app.plan_models import Knobs, build_run  # noqa: E402
from tests.models_tiny_backbones import randomize_lora  # noqa: E402
from tests.test_plan import TINY, _one_thread_torch_ops  # noqa: E402, F401 (the autouse fixture: 1 thread, torch ops)

# a CLIP tower small enough for CI, in the place of the planner's ViT-L/14 config
TINY_TOWER = {
    "projection_dim": 16,
    "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                    "max_position_embeddings": 8, "vocab_size": 64, "projection_dim": 16, "eos_token_id": 2},
    "vision_config": {"hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 3,
                      "image_size": 32, "patch_size": 4, "projection_dim": 16},
}  # fmt: skip


# the planner's traces cost ~6 s each here: CI runs one per knob at most; FLOWKERN_PLAN_MATRIX=1 runs every check
MATRIX = os.environ.get("FLOWKERN_PLAN_MATRIX") == "1"


def _knobs(method: str = "refl", **extra) -> dict:
    k = {"refl": {"K": 2}, "draft": {"K": 2}, "dam": {"K": 2}, "vggflow": {"consistency": "fd"}}.get(method, {})
    return {**dict(precision="fp32", batch=2, lora_rank=4, micro_batch=1, method=method, **k), **extra}


def _measured_and_predicted(backbone: str, knobs: dict) -> tuple[int, int]:
    trainer, _ = build_run(TINY[backbone], Knobs(**knobs))
    with planner.no_cyclic_gc():
        measured = peak_memory(trainer.train_step)
    assert not trainer.skipped, trainer.skipped
    return measured, planner.plan(TINY[backbone], device="cpu", **knobs)["update"]["peak_bytes"]


# ---------------------------------------------------------------- (a) recompute granularity
def _velocity_step(backbone: str, recompute: str) -> tuple[int, list[torch.Tensor], torch.Tensor]:
    """(exact peak of one fine-tuned velocity's forward + backward, LoRA gradients, a VJP of the *base* velocity
    whose backward runs after ``base_velocity()`` has exited) with ``recompute``."""
    trainer, resident = build_run(TINY[backbone], Knobs(**_knobs(), recompute=recompute))
    randomize_lora(resident["transformer"])  # LoRA on and off differ: a recomputation in the wrong state shows
    model, params = trainer.model, trainer.model.trainable_parameters()
    x0, cond = trainer.draw(2)
    t = torch.full((2,), 0.3)

    def step():
        model.velocity(x0, t, cond, detach_uncond=True).square().sum().backward()

    peak = peak_memory(step)
    x = x0.clone().requires_grad_(True)
    with model.base_velocity():
        v = model.velocity(x, t, cond)
    (vjp,) = torch.autograd.grad(v.square().sum(), x)  # recomputed outside base_velocity(): LoRA must stay off
    return peak, [p.grad.clone() for p in params], vjp


@pytest.mark.parametrize("backbone", ["sd3", "flux", "flux2", "sit"])
def test_recompute_granularity_keeps_gradients_bitwise_and_lowers_the_peak(backbone):
    if not MATRIX and backbone in ("flux", "flux2"):
        pytest.skip("SD3 and SiT in CI; FLOWKERN_PLAN_MATRIX=1 runs FLUX.1 and FLUX.2 too")
    runs = {r: _velocity_step(backbone, r) for r in ("none", "block", "sublayer")}
    for r in ("block", "sublayer"):
        assert all(torch.equal(a, b) for a, b in zip(runs["none"][1], runs[r][1], strict=True)), r
        assert torch.equal(runs["none"][2], runs[r][2]), f"{r}: base-velocity VJP recomputed with the LoRA on"
    peaks = {r: run[0] for r, run in runs.items()}
    print(backbone, peaks)
    assert peaks["block"] < peaks["none"]
    if backbone in ("sd3", "sit"):  # attention + MLP internals dominate a block's recomputation
        assert peaks["sublayer"] < peaks["block"]
    else:  # FLUX.1 / FLUX.2 at tiny width: their single blocks' inline MLP stays; the extra saved inputs cost more
        assert peaks["sublayer"] < 1.05 * peaks["block"]


@pytest.mark.skipif(not MATRIX, reason="a planner trace per knob in CI; FLOWKERN_PLAN_MATRIX=1 runs this one too")
def test_recompute_sublayer_planned_within_5_percent():
    measured, predicted = _measured_and_predicted("sit", _knobs(recompute="sublayer", batch=1, K=1, num_steps=2))
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def test_set_recompute_switches_and_reports_its_granularity():
    trainer, _ = build_run(TINY["sd3"], Knobs(**_knobs()))
    flow = trainer.model.flow
    for r in ("sublayer", "none", "block"):
        flow.set_recompute(r)
        assert flow.recompute == r
    with pytest.raises(ValueError, match=r"^--recompute: expected one of none, block, sublayer, got 'blocks:2'$"):
        flow.set_recompute("blocks:2")


# ---------------------------------------------------------------- (b) reward-tower checkpointing
def test_reward_tower_checkpointing_lowers_the_peak_bitwise_and_is_planned(monkeypatch):
    monkeypatch.setitem(plan_models.REWARD_TOWERS, "aesthetic", TINY_TOWER)
    out = {}
    for on in (False, True):
        knobs = _knobs(reward="aesthetic", checkpoint_reward=on, batch=1, K=1, num_steps=2)
        trainer, resident = build_run(TINY["sit"], Knobs(**knobs))
        assert resident["reward"].rewards["aesthetic"].checkpointing is on
        with planner.no_cyclic_gc():
            measured = peak_memory(trainer.train_step)
        assert not trainer.skipped
        # the update's loss and the LoRA after its AdamW step (the gradients are freed by then)
        after = [p.detach().clone() for p in trainer.model.trainable_parameters()]
        if MATRIX or on:  # the default (on) in CI
            predicted = planner.plan(TINY["sit"], device="cpu", **knobs)["update"]["peak_bytes"]
            print("checkpoint_reward", on, measured, predicted)
            assert abs(predicted - measured) <= 0.05 * measured, (on, predicted, measured)
        out[on] = measured, trainer.history[-1]["loss"], after
    assert out[True][0] < 0.8 * out[False][0]
    assert out[True][1] == out[False][1]
    assert all(torch.equal(a, b) for a, b in zip(out[False][2], out[True][2], strict=True))


# ---------------------------------------------------------------- (c) trajectory offload
@pytest.mark.parametrize("method", ["dam", "am", "vggflow", "draft", "refl"])
def test_offloaded_trajectory_gives_bitwise_equal_loss_and_gradients(method, monkeypatch):
    if not MATRIX and method not in ("dam", "vggflow"):
        pytest.skip("DAM (the adjoint sweep) and VGG-Flow (transitions) in CI; FLOWKERN_PLAN_MATRIX=1 runs all")
    import flowkern.sampling

    calls = []
    make = flowkern.sampling.host_buffer
    monkeypatch.setattr(flowkern.sampling, "host_buffer", lambda *a: calls.append(a) or make(*a))
    out = {}
    for off in (False, True):
        calls.clear()
        trainer, _ = build_run(TINY["sit"], Knobs(**_knobs(method, offload_trajectory=off)))
        assert trainer.method.offload_trajectory is off
        x0, cond = trainer.draw(2)
        batch = trainer.method.rollout(x0, trainer.ts, cond, generator=trainer.process_generator)
        loss, _ = trainer.method.loss(batch)
        loss.backward()
        assert len(calls) == int(off)  # the stored states went through host_buffer only when offloaded
        out[off] = loss.detach(), [p.grad.clone() for p in trainer.model.trainable_parameters()]
    assert torch.equal(out[False][0], out[True][0])
    assert all(torch.equal(a, b) for a, b in zip(out[False][1], out[True][1], strict=True))


def test_offload_is_counted_off_the_gpu():
    knobs = _knobs("dam", offload_trajectory=True, batch=1, K=1, num_steps=2)
    on = planner.plan(TINY["sit"], device="cuda", **knobs)
    n_states, state = 2 + 1, 1 * 4 * 8 * 8 * 4  # N+1 states of [B=1, 4, 8, 8] fp32
    assert on["update"]["offloaded_bytes"] == n_states * state
    # at the peak (the terminal reward's gradient) only x_N, fetched back, is on the GPU: not the N+1 states
    assert on["update"]["peak_phase"] == "reward"
    assert on["update"]["kinds"]["stored_trajectory"] == state
    assert "offloaded to pinned CPU memory (not on the GPU)" in planner.format_table(on)
    if MATRIX:
        off = planner.plan(TINY["sit"], device="cuda", **{**knobs, "offload_trajectory": False})
        assert off["update"]["offloaded_bytes"] == 0
        assert off["update"]["kinds"]["stored_trajectory"] == n_states * state


@pytest.mark.skipif(not MATRIX, reason="a planner trace per knob in CI; FLOWKERN_PLAN_MATRIX=1 runs this one too")
def test_offload_planned_within_5_percent_in_cpu_mode():
    measured, predicted = _measured_and_predicted("sit", _knobs("dam", offload_trajectory=True, batch=1, K=1))
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


# ---------------------------------------------------------------- the budget search, flags and bad values
def test_candidates_go_cheapest_first_and_each_keeps_the_previous():
    names = [what for what, _ in planner.candidate_knobs(dict(method="dam", batch=4, K=3))]
    assert names == [
        "no gradient checkpointing (fastest)",
        "checkpoint the VAE decode only",
        "per-block checkpointing of the backbone, per-layer of the VAE and the reward tower (the default)",
        "offload the stored trajectory to pinned CPU memory",
        "recompute the backbone per sublayer (attention, MLP)",
        "batch 1 with 4 accumulation steps",
        "K = 1 (changes the method's truncation)",
    ]
    last = planner.candidate_knobs(dict(method="dam", batch=4, K=3))[-1][1]
    assert last["offload_trajectory"] and last["recompute"] == "sublayer" and last["batch"] == 1 and last["K"] == 1
    line = planner.knob_line(last)
    assert line == (
        "recompute sublayer, VAE checkpointing on, reward-tower checkpointing on, trajectory offload on, "
        "batch 1 x 4 accumulation, K 1, base bf16"
    )


def test_train_budget_applies_the_chosen_knobs(monkeypatch):
    from flowkern.app import run

    def fake_plan(model, device="cuda", **knobs):  # fits once the trajectory is offloaded and sublayers recompute
        fits = knobs.get("offload_trajectory") and knobs.get("recompute") == "sublayer"
        return {"model": "m", "total_bytes": (10 if fits else 30) * 2**30, "cuda_context_bytes": 0, "knobs": knobs}

    monkeypatch.setattr(planner, "plan", fake_plan)
    opts = run.TrainOptions(model="sit-xl-2", method="dam", batch_size=2, memory_budget="16GiB")
    lines = []
    run._fit_budget(opts, lines.append)
    assert (opts.recompute, opts.offload_trajectory, opts.checkpoint_reward) == ("sublayer", True, True)
    assert opts.batch_size == 2
    assert lines == [
        "--memory-budget 16GiB: recompute the backbone per sublayer (attention, MLP): recompute sublayer, VAE "
        "checkpointing on, reward-tower checkpointing on, trajectory offload on, batch 2 x 1 accumulation, K None, "
        "base fp32"
    ]


def test_train_budget_plans_its_reward_hvp_and_takes_a_quantized_base(monkeypatch):
    from flowkern.app import run

    planned = []

    def fake_plan(model, device="cuda", **knobs):  # bf16 never fits (its weights); an int8 base does
        planned.append(knobs)
        fits = knobs.get("base_precision") == "int8"
        return {"model": "m", "total_bytes": (10 if fits else 30) * 2**30, "cuda_context_bytes": 0, "knobs": knobs}

    monkeypatch.setattr(planner, "plan", fake_plan)
    monkeypatch.setattr(planner, "quantized_bases", lambda model, device="cuda": ("int8", "fp8"))
    opts = run.TrainOptions(model="flux1-dev", method="vggflow", consistency="exact", reward_hvp="autograd",
                            precision="bf16", batch_size=1, memory_budget="16GiB")  # fmt: skip
    lines = []
    run._fit_budget(opts, lines.append)
    assert planned and all(k["reward_hvp"] == "autograd" for k in planned)
    assert opts.base_precision == "int8" and opts.reward_hvp == "autograd"
    assert lines[0].startswith("--memory-budget 16GiB: int8 base: checkpoint the VAE decode only") and lines[
        0
    ].endswith("base int8")


def test_bad_knob_values_name_the_setting():
    from flowkern.app.run import TrainOptions
    from flowkern.cli import RECOMPUTE_CHOICES
    from flowkern.models._adapter import RECOMPUTE

    assert RECOMPUTE_CHOICES == RECOMPUTE
    with pytest.raises(ValueError, match=r"^--recompute: expected one of none, block, sublayer, got 'attention'$"):
        Knobs(recompute="attention").check(TINY["sit"])
    with pytest.raises(ValueError, match=r"^checkpoint_reward: expected True or False, got 'yes'$"):
        Knobs(checkpoint_reward="yes").check(TINY["sit"])
    with pytest.raises(ValueError, match=r"^offload_trajectory: expected True or False, got 1$"):
        Knobs(offload_trajectory=1).check(TINY["sit"])
    with pytest.raises(ValueError, match=r"^--recompute: expected one of"):
        TrainOptions(recompute="blocks").check()
    with pytest.raises(ValueError, match=r"^--checkpoint-reward must be"):
        TrainOptions(checkpoint_reward="no").check()
    with pytest.raises(ValueError, match=r"^--offload-trajectory must be"):
        TrainOptions(offload_trajectory="yes").check()


def test_cli_flags_reach_the_options():
    from flowkern.cli import _build_parser

    parser = _build_parser()
    args = parser.parse_args(
        ["plan", "sit-xl-2", "--recompute", "sublayer", "--no-checkpoint-reward", "--offload-trajectory"]
    )
    assert (args.recompute, args.checkpoint_reward, args.offload_trajectory) == ("sublayer", False, True)
    args = parser.parse_args(["train", "--recompute", "none", "--no-checkpoint-reward", "--offload-trajectory"])
    assert (args.recompute, args.checkpoint_reward, args.offload_trajectory) == ("none", False, True)
    assert "recompute" not in vars(parser.parse_args(["train"]))  # not given: the options' defaults (or --config)


def test_cli_plan_passes_reward_hvp_and_prints_the_chosen_base(monkeypatch, capsys):
    from flowkern.cli import main

    planned = []

    def fake_plan(model, device="cuda", **knobs):  # only an fp8 base fits
        planned.append(knobs)
        need = (10 if knobs.get("base_precision") == "fp8" else 30) * 2**30
        return {"model": "m", "total_bytes": need, "cuda_context_bytes": 0, "knobs": knobs}

    monkeypatch.setattr(planner, "plan", fake_plan)
    monkeypatch.setattr(planner, "quantized_bases", lambda model, device="cuda": ("int8", "fp8"))
    argv = ["plan", "sit-xl-2", "--method", "vggflow", "--consistency", "exact", "--reward-hvp", "autograd", "--json"]
    assert main(argv) == 0 and planned[-1]["reward_hvp"] == "autograd"
    capsys.readouterr()
    assert main([*argv, "--memory-budget", "16GiB"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert chosen["choice"].startswith("fp8 base: ") and chosen["prediction"]["knobs"]["base_precision"] == "fp8"
    assert all(k["reward_hvp"] == "autograd" for k in planned)
