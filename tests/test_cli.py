"""The ``flowkern`` command line: train/eval/plot/bench on the 2-D toy, config files, resume, bad input, accelerate.

Runs go through ``flowkern.cli.main(argv)`` in-process (the toy model: a few updates take about a second); one
subprocess checks the ``python -m flowkern`` entry point and one ``accelerate launch`` runs two processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowkern.cli import main

REPO = Path(__file__).resolve().parents[1]
TOY = [
    "--model",
    "toy",
    "--reward",
    "bump",
    "--num-steps",
    "4",
    "--batch-size",
    "4",
    "--no-progress",
    "--eval-samples",
    "4",
]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def tree(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``path`` (what 'nothing overwritten' compares)."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert "error:" in lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def env_with_repo() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished 4-update VGG-Flow toy run (shared by eval/plot/bad-resume tests)."""
    out = tmp_path_factory.mktemp("runs") / "toy"
    assert main(["train", *TOY, "--steps", "4", "--checkpoint-every", "2", "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------- help
def test_help_lists_commands_and_flags(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for command in ("demo", "train", "eval", "plot", "bench"):
        assert command in out
    rc, out, _ = run(capsys, "train", "--help")
    assert rc == 0
    for flag in (
        "--method",
        "--reward",
        "--beta",
        "--lam",
        "--K",
        "--p",
        "--eta",
        "--lora-rank",
        "--steps",
        "--batch-size",
        "--grad-accum",
        "--micro-batch",
        "--resolution",
        "--precision",
        "--out",
        "--config",
        "--resume",
        "--tensorboard",
        "vggflow",
        "draft",
        "accelerate launch",
    ):
        assert flag in out, flag
    rc, out, _ = run(capsys, "demo", "--help")
    assert rc == 0 and "--methods" in out and "--fast" in out


# ---------------------------------------------------------------- a run and what it writes
def test_train_writes_log_checkpoints_lora_eval_and_plots(toy_run):
    log = [json.loads(line) for line in (toy_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    assert all(r["method"] == "vggflow" and isinstance(r["reward_mean"], float) for r in log)
    assert sorted(p.name for p in (toy_run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert (toy_run / "lora" / "toy_residual.safetensors").is_file()
    assert (toy_run / "value_net.safetensors").is_file()
    result = json.loads((toy_run / "eval.json").read_text())
    assert result["updates"] == 4 and result["method"] == "vggflow"
    assert result["tuned"]["prior_distance"] > 0  # the residual moved off zero
    config = json.loads((toy_run / "run_config.json").read_text())
    assert config["steps"] == 4 and config["reward"] == ["bump"]
    from PIL import Image

    for name in ("reward.png", "loss.png"):
        with Image.open(toy_run / name) as image:
            assert image.size == (720, 440)


def test_plot_redraws_from_the_log(toy_run, capsys):
    (toy_run / "reward.png").unlink()
    rc, out, _ = run(capsys, "plot", toy_run)
    assert rc == 0 and "reward.png" in out and (toy_run / "reward.png").is_file()


def test_eval_scores_a_saved_lora_against_the_base(toy_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc, stdout, _ = run(
        capsys,
        "eval",
        "--model",
        "toy",
        "--lora",
        toy_run,
        "--reward",
        "bump",
        "--samples",
        "8",
        "--num-steps",
        "4",
        "--out",
        out,
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert json.loads(stdout) == result
    assert result["samples"] == 8 and result["tuned"]["n"] == 8
    assert result["tuned"]["prior_distance"] > 0 and "prior_distance" not in result["base"]
    # same seeds: evaluating twice gives identical numbers; the base of eval is the model with the residual off
    rc, again, _ = run(
        capsys,
        "eval",
        "--model",
        "toy",
        "--lora",
        toy_run / "lora",
        "--reward",
        "bump",
        "--samples",
        "8",
        "--num-steps",
        "4",
    )
    assert json.loads(again)["tuned"] == result["tuned"]


def test_config_file_and_flags_override_it(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {
                "model": "toy",
                "reward": "bump",
                "method": "dam",
                "beta": 3.0,
                "steps": 5,
                "num_steps": 4,
                "batch_size": 4,
                "eval_samples": 4,
            }
        )
    )
    out = tmp_path / "run"
    rc, _, err = run(capsys, "train", "--config", config, "--steps", "2", "--out", out, "--no-progress")
    assert rc == 0, err
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["steps"] == 2 and saved["method"] == "dam" and saved["beta"] == 3.0
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def test_resume_continues_bit_exactly(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ["train", *TOY, "--checkpoint-every", "0"]
    assert run(capsys, *args, "--steps", "4", "--out", straight)[0] == 0
    assert run(capsys, *args, "--steps", "2", "--out", split)[0] == 0
    rc, out, err = run(capsys, *args, "--steps", "4", "--out", split, "--resume")
    assert rc == 0, err
    assert "resumed" in out
    for name in ("lora/toy_residual.safetensors", "value_net.safetensors"):
        a, b = load_file(straight / name), load_file(split / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    log_a = (straight / "log.jsonl").read_text().splitlines()
    log_b = (split / "log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in lines]
    assert strip(log_a) == strip(log_b)  # the log of the resumed run has each update once


# ---------------------------------------------------------------- bad input: one line, non-zero, nothing written
@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--method", "sgd"], ["unknown method 'sgd'", "vggflow"]),
        (["--reward", "beauty"], ["unknown reward 'beauty'", "bump"]),
        (["--reward", "bump:abc"], ["weight must be a number"]),
        (["--model", "no/such/dir/here"], ["does not exist"]),
        (["--beta", "-1"], ["--beta must be a finite number > 0"]),
        (["--beta", "1", "--lam", "1"], ["one of --beta and --lam"]),
        (["--K", "0"], ["--K must be an int in [1, 4]"]),
        (["--K", "9"], ["--K must be an int in [1, 4]"]),
        (["--p", "1"], ["--p must be a finite number > 1"]),
        (["--subsample", "1.5"], ["--subsample must be in (0, 1]"]),
        (["--steps", "0"], ["--steps", "must be >= 1"]),
        (["--lr", "nan"], ["--lr", "finite number > 0"]),
        (["--beta", "abc"], ["--beta", "expected a number"]),
        (["--precision", "fp8"], ["--precision", "invalid choice"]),
        (["--micro-batch", "0"], ["--micro-batch", "must be >= 1"]),
    ],
)
def test_bad_flags_fail_with_one_line_and_write_nothing(extra, needles, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run(capsys, "train", *TOY, "--steps", "2", "--out", out, *extra)
    assert rc == 2
    one_error_line(err, *needles)
    assert not out.exists()


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc, _, err = run(capsys, "train", *TOY, "--steps", "1", "--out", blocker / "run")
    assert rc == 2
    one_error_line(err, "output")
    assert blocker.read_text() == "not a directory"
    rc, _, err = run(capsys, "demo", "--fast", "--out", blocker)
    assert rc == 2
    one_error_line(err, "not a directory")


def test_existing_run_is_not_overwritten_without_resume(toy_run, capsys):
    before = tree(toy_run)
    rc, _, err = run(capsys, "train", *TOY, "--steps", "2", "--out", toy_run)
    assert rc == 2
    one_error_line(err, "already holds a run", "--resume")
    assert tree(toy_run) == before
    # --overwrite replaces a run only once the new one has started: a bad new run keeps the old one
    rc, _, err = run(capsys, "train", *TOY, "--steps", "2", "--out", toy_run, "--overwrite", "--reward", "bump:0")
    assert rc == 2
    one_error_line(err, "non-zero")
    rc, _, err = run(capsys, "train", *TOY, "--steps", "2", "--out", toy_run, "--overwrite", "--model", "./missing")
    assert rc == 2
    one_error_line(err, "does not exist")
    assert tree(toy_run) == before


def test_corrupt_and_incompatible_checkpoints_are_refused(toy_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(toy_run, run_dir)
    # settings that differ from the checkpoint's run
    before = tree(run_dir)
    rc, _, err = run(capsys, "train", *TOY, "--method", "dam", "--steps", "6", "--out", run_dir, "--resume")
    assert rc == 2
    one_error_line(err, "other settings", "method")
    # the same, without run_config.json to catch it early: the trainer's own fingerprint check refuses the state
    (run_dir / "run_config.json").unlink()
    before = tree(run_dir)
    rc, _, err = run(capsys, "train", *TOY, "--method", "dam", "--steps", "6", "--out", run_dir, "--resume")
    assert rc == 2
    one_error_line(err, "checkpoint")
    assert tree(run_dir) == before
    # a truncated tensor file in the newest checkpoint
    tensors = run_dir / "checkpoints" / "step-00000004" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    before = tree(run_dir)
    rc, _, err = run(capsys, "train", *TOY, "--steps", "6", "--out", run_dir, "--resume")
    assert rc == 2
    one_error_line(err, "step-00000004")
    assert tree(run_dir) == before
    # nothing to resume
    rc, _, err = run(capsys, "train", *TOY, "--steps", "2", "--out", tmp_path / "empty", "--resume")
    assert rc == 2
    one_error_line(err, "no complete checkpoint")


def test_bad_config_file_and_lora(tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text('{"model": "toy", "learning_rate": 1}')
    rc, _, err = run(capsys, "train", "--config", config, "--out", tmp_path / "r")
    assert rc == 2
    one_error_line(err, "unknown setting", "learning_rate")
    config.write_text("{not json")
    rc, _, err = run(capsys, "train", "--config", config, "--out", tmp_path / "r")
    assert rc == 2
    one_error_line(err, "not valid JSON")
    rc, _, err = run(capsys, "eval", "--model", "toy", "--lora", tmp_path / "missing")
    assert rc == 2
    one_error_line(err, "does not exist")
    assert not (tmp_path / "r").exists()


def test_bench_wraps_pytest_with_a_filter(tmp_path, capsys):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "test_fake.py").write_text("def test_alpha():\n    pass\n\ndef test_beta():\n    raise AssertionError\n")
    rc = main(["bench", "--dir", str(bench), "-k", "alpha", "--", "-q", "-p", "no:cacheprovider"])
    out = capsys.readouterr().out
    assert rc == 0, out  # test_beta (failing) was filtered out
    assert f"pytest {bench} -k alpha -q" in out  # the command it ran, printed first
    rc, _, err = run(capsys, "bench", "--dir", tmp_path / "nope")
    assert rc == 2
    one_error_line(err, "benchmarks directory")


# ---------------------------------------------------------------- processes
def test_python_m_flowkern_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flowkern", "train", "--model", "toy", "--method", "nope", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env=env_with_repo(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "flowkern train: error: unknown method 'nope'; known: vggflow, dam, am, refl, draft"
    ]
    assert not (tmp_path / "r").exists()


TORCHAO_IMPORT_NOISE = ("Failed to load", "torchao", "is an Enum subclass")  # flowkern._import_noise


def test_torchao_import_noise_is_silenced_and_bf16_vggflow_trains_tiny(tmp_path):
    """torchao installed (the quant extra): neither --help nor a tiny run prints its import log lines on stderr. The
    run is bf16 VGG-Flow with 'exact' consistency (M21, the bf16 default, named here so the test keeps testing it),
    which takes the Hessian-vector product of the redness reward, linear in the tiny (pixel-space) model's samples:
    H = 0, which used to fail with "element 0 of tensors does not require grad"."""
    out = tmp_path / "r"
    args = ["--model", "tiny", "--method", "vggflow", "--precision", "bf16", "--consistency", "exact", "--steps", "1"]
    args += ["--num-steps", "2"]
    args += ["--batch-size", "2", "--eval-samples", "2", "--checkpoint-every", "0", "--no-progress", "--out", str(out)]
    for argv in (["--help"], ["train", *args]):
        proc = subprocess.run(
            [sys.executable, "-m", "flowkern", *argv], capture_output=True, text=True, env=env_with_repo(), timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        noise = [line for line in proc.stderr.splitlines() if any(n in line for n in TORCHAO_IMPORT_NOISE)]
        assert not noise, noise
    assert len((out / "log.jsonl").read_text().splitlines()) == 1 and (out / "lora").is_dir()


def test_import_noise_filters_drop_only_torchao_import_lines():
    """The filters match their one message on their one logger; other warnings of the same loggers pass."""
    import enum
    import logging

    from flowkern._import_noise import FILTERS

    def passes(logger: str, msg: str, *args) -> bool:
        return FILTERS[logger].filter(logging.LogRecord(logger, logging.WARNING, "f.py", 1, msg, args, None))

    torchao_enum = enum.Enum("KernelPreference", "AUTO")
    torchao_enum.__module__ = "torchao.quantization.quantize_.common"
    other_enum = enum.Enum("Other", "A")
    enum_msg = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
    assert not passes("torchao", "Failed to load /x/torchao/_C_mxfp8.so: Could not load this library")
    assert passes("torchao", "Skipping import of cpp extensions due to incompatible torch version.")
    assert not passes("torch.utils._pytree", enum_msg, torchao_enum)
    assert passes("torch.utils._pytree", enum_msg, other_enum)
    diffusers = "diffusers.quantizers.torchao.torchao_quantizer"
    assert not passes(diffusers, "Unable to import `torchao` Tensor objects. This may affect loading checkpoints")
    assert passes(diffusers, "some other diffusers warning")
    assert all(f in logging.getLogger(name).filters for name, f in FILTERS.items())  # installed by `import flowkern`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes_matches_one_process_with_double_batch(tmp_path, capsys):
    """2 CPU processes (gloo) x batch 2 == 1 process x batch 4: same draws, gradients averaged (DAM: no other noise)."""
    pytest.importorskip("accelerate")
    args = [
        "--model",
        "toy",
        "--reward",
        "bump",
        "--method",
        "dam",
        "--num-steps",
        "4",
        "--steps",
        "2",
        "--checkpoint-every",
        "0",
        "--eval-samples",
        "4",
        "--no-progress",
    ]
    two = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "flowkern",
        "train",
        *args,
        "--batch-size",
        "2",
        "--out",
        str(two),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_with_repo(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((two / "run_config.json").read_text())["num_processes"] == 2
    one = tmp_path / "one"
    assert run(capsys, "train", *args, "--batch-size", "4", "--out", one)[0] == 0
    a, b = load_file(one / "lora" / "toy_residual.safetensors"), load_file(two / "lora" / "toy_residual.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in a.values())  # training moved the residual
    rewards = lambda d: [json.loads(x)["reward_mean"] for x in (d / "log.jsonl").read_text().splitlines()]
    assert rewards(one) == pytest.approx(rewards(two), rel=1e-5)


# ---------------------------------------------------------------- an SD3 pipeline directory
def test_train_and_eval_an_sd3_pipeline_directory(tmp_path, capsys):
    """A saved (tiny, random) StableDiffusion3Pipeline: prompts encoded by its text encoders, VAE-decoded reward."""
    from tests.test_sd3_adapter import _tiny_pipeline

    _tiny_pipeline().save_pretrained(tmp_path / "pipe")
    capsys.readouterr()  # drop the save's progress output
    common = ["--model", tmp_path / "pipe", "--reward", "brightness", "--num-steps", "2", "--no-progress"]
    rc, _, err = run(capsys, "train", *common, "--out", tmp_path / "r0")
    assert rc == 2
    one_error_line(err, "needs prompts")
    assert not (tmp_path / "r0").exists()
    out = tmp_path / "run"
    rc, _, err = run(
        capsys,
        "train",
        *common,
        "--prompt",
        "a cat",
        "--method",
        "draft",
        "--K",
        "1",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--lora-rank",
        "2",
        "--eval-samples",
        "2",
        "--out",
        out,
    )
    assert rc == 0, err
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    rc, stdout, err = run(
        capsys,
        "eval",
        "--model",
        tmp_path / "pipe",
        "--lora",
        out,
        "--prompt",
        "a cat",
        "--reward",
        "brightness",
        "--samples",
        "2",
        "--num-steps",
        "2",
    )
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["prompts"] == ["a cat"] and 0 <= result["tuned"]["reward_mean"] <= 1


@pytest.mark.parametrize(
    "method,extra",
    [("dam", ["--K", "2"]), ("vggflow", ["--precision", "bf16"])],  # bf16 picks 'exact' consistency (M21)
)
def test_pipeline_defaults_train_dam_and_bf16_vggflow(method, extra, tmp_path, capsys):
    """A pipeline trains with its memory defaults (micro-batches of 1, transformer and VAE checkpointing with the
    LoRA off in the base velocity's VJPs); bf16 VGG-Flow's 'exact' consistency runs through the VAE decode."""
    from tests.test_sd3_adapter import _tiny_pipeline

    _tiny_pipeline().save_pretrained(tmp_path / "pipe")
    capsys.readouterr()
    out = tmp_path / "run"
    rc, _, err = run(
        capsys, "train", "--model", tmp_path / "pipe", "--reward", "brightness", "--num-steps", "2", "--no-progress",
        "--prompt", "a cat", "--method", method, "--steps", "1", "--batch-size", "2", "--lora-rank", "2",
        "--eval-samples", "2", "--out", out, *extra,
    )  # fmt: skip
    assert rc == 0, err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["skipped"] == 0 and math.isfinite(log[0]["loss"])


def test_train_flux_and_sit_directories(tmp_path, capsys):
    """FLUX.1 (text prompts, embedded guidance) and SiT (class ids) pipeline directories through their adapters."""
    from tests.models_tiny_backbones import tiny_dit_transformer, tiny_flux_pipeline, tiny_vae

    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    (tmp_path / "sit").mkdir()
    tiny_dit_transformer().save_pretrained(tmp_path / "sit" / "transformer")
    tiny_vae("kl").save_pretrained(tmp_path / "sit" / "vae")
    capsys.readouterr()
    common = [
        "--reward",
        "brightness",
        "--method",
        "draft",
        "--K",
        "1",
        "--steps",
        "1",
        "--num-steps",
        "2",
        "--batch-size",
        "2",
        "--lora-rank",
        "2",
        "--eval-samples",
        "2",
        "--no-progress",
    ]
    rc, _, err = run(
        capsys,
        "train",
        "--model",
        tmp_path / "flux",
        "--prompt",
        "a cat",
        "--resolution",
        "16",
        *common,
        "--out",
        tmp_path / "r_flux",
    )
    assert rc == 0, err
    assert json.loads((tmp_path / "r_flux" / "eval.json").read_text())["model"] == str(tmp_path / "flux")
    rc, _, err = run(
        capsys,
        "train",
        "--model",
        tmp_path / "sit",
        "--prompt",
        "3",
        "--prompt",
        "7",
        *common,
        "--out",
        tmp_path / "r_sit",
    )
    assert rc == 0, err
    assert (tmp_path / "r_sit" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    rc, _, err = run(capsys, "train", "--model", tmp_path / "sit", "--prompt", "12", *common, "--out", tmp_path / "x")
    assert rc == 2
    one_error_line(err, "class ids must be in [0, 10)")


def test_tensorboard_flag(tmp_path, capsys):
    import importlib.util

    out = tmp_path / "run"
    if importlib.util.find_spec("tensorboard") is not None:  # installed: the run writes event files
        assert run(capsys, "train", *TOY, "--steps", "1", "--out", out, "--tensorboard")[0] == 0
        assert any((out / "tensorboard").iterdir())
        return
    rc, _, err = run(capsys, "train", *TOY, "--steps", "1", "--out", out, "--tensorboard")
    assert rc == 2
    one_error_line(err, "needs the tensorboard package")
    assert not out.exists()
