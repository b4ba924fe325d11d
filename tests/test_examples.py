"""The drop-in examples (issue 5): examples/sd3_vggflow_flowkern.py is examples/sd3_vggflow_unfused.py
with the hand-written VGG-Flow matching loss (M16) and the unrolled DRaFT-K backward (M23) replaced by
`flowkern.vggflow_matching_loss` and `flowkern.truncated_backprop`. Both train a tiny stock SD3
pipeline saved to and loaded from disk; the flowkern loop must give the unfused loop's losses and
LoRA gradients, update for update.

The README's examples too: its Python snippets run as written, and its commands exist and parse.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_sd3_adapter import _tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"
COMMON = ["--steps", "2", "--num-inference-steps", "4", "--batch-size", "2", "--resolution", "16"]
COMMON += ["--max-sequence-length", "16", "--lr", "1e-2", "--beta", "1000", "--draft-k", "3", "--seed", "3"]
COMMON += ["--device", "cpu", "--prompt", "a cat", "red bird"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd3")
    _tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cli_run(pipe_dir, tmp_path_factory):
    """The flowkern script's CLI for one update, started in the background: its imports (~6 s of CPU)
    overlap the in-process tests, which request this fixture first."""
    out = tmp_path_factory.mktemp("cli") / "lora"
    script = EXAMPLES / "sd3_vggflow_flowkern.py"
    argv = [sys.executable, str(script), "--model", str(pipe_dir), *COMMON, "--output-dir", str(out)]
    argv[argv.index("--steps") + 1] = "1"
    # this checkout's flowkern first (the script runs from examples/, outside the repository root)
    path = os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    yield proc, out
    if proc.poll() is None:  # the CLI test was deselected
        proc.kill()
        proc.communicate()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the CLI smoke runs beside
    yield
    torch.set_num_threads(threads)


def _reward(images: torch.Tensor) -> torch.Tensor:
    """A reward with curvature (closeness to a fixed image), so the K-step gradient is not linear."""
    target = torch.rand(images.shape[1:], generator=torch.Generator().manual_seed(11))
    return -(images - target).square().mean(dim=(1, 2, 3))


def _run(name: str, pipe_dir: Path, extra: list[str]) -> dict:
    from diffusers import StableDiffusion3Pipeline

    module = _load(name)
    args = module.parse_args(["--model", str(pipe_dir), *COMMON, *extra])
    pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir, local_files_only=True)
    return module.train(pipe, _reward, args)


@pytest.mark.parametrize(
    "part, extra",
    [("matching", ["--draft-weight", "0"]), ("draft", ["--matching-weight", "0", "--draft-weight", "1"])],
)
def test_flowkern_drop_ins_match_the_unfused_loop(pipe_dir, cli_run, part, extra):
    unfused = _run("sd3_vggflow_unfused", pipe_dir, extra)
    fused = _run("sd3_vggflow_flowkern", pipe_dir, extra)

    # fp32 throughout; the loops differ only in summation order and association (the fused loss sums
    # per-chunk partials and forms v_ft - v_base - beta*eta*g in one expression; the engine scales the
    # terminal gradient by -w/B before the backward instead of after the mean). Measured: step 1 within
    # 1e-7 relative, the DRaFT part bitwise. Step 2 starts from weights after one AdamW step, whose
    # update g/(sqrt(v)+eps) of near-zero gradient entries amplifies those ulps: measured 1e-5 of the
    # largest gradient. Bounds: 10x the measurements; a wrong sign, eta or scale is an O(1) error.
    history = zip(unfused["history"], fused["history"], strict=True)
    for step, (a, b) in enumerate(history):
        for key in ("reward", "loss_matching", "loss_draft", "grad_norm", "tau"):
            assert b[key] == pytest.approx(a[key], rel=1e-6 if step == 0 else 1e-4, abs=1e-12), (key, a, b)
    assert unfused["grads"].keys() == fused["grads"].keys() and len(unfused["grads"]) > 0
    scale = max(g.abs().max().item() for g in unfused["grads"].values())
    assert scale > 0, f"{part}: the LoRA received no gradient"
    for name, g in unfused["grads"].items():
        torch.testing.assert_close(fused["grads"][name], g, rtol=1e-3, atol=1e-4 * scale, msg=name)
    loss = "loss_matching" if part == "matching" else "loss_draft"
    assert all(abs(h[loss]) > 0 for h in unfused["history"])

    # training moved the LoRA: lora_B starts at zero ('gaussian' init), so only gradients can move it
    moved = [n for n in fused["lora_final"] if "lora_B" in n]
    assert moved and all((fused["lora_final"][n] - fused["lora_initial"][n]).abs().max() > 0 for n in moved)


def test_cli_one_step_saves_a_stock_lora(cli_run):
    proc, out = cli_run
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "step 1/1" in stdout
    from safetensors.torch import load_file

    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") and "lora_" in k for k in weights)


def test_help_and_bad_arguments(capsys):
    module = _load("sd3_vggflow_unfused")
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--draft-k" in text and "--beta" in text and "--model" in text
    with pytest.raises(SystemExit):
        module.parse_args(["--model", "x", "--num-inference-steps", "4", "--draft-k", "5"])
    assert "--draft-k" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--reward"):
        module.load_reward("not_a_spec")


def _apply_unified_diff(source: list[str], diff: list[str]) -> list[str]:
    """Apply a one-file unified diff, checking every context and removed line against ``source``."""
    out, pos = [], 0
    for line in diff:
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("@@"):
            start = int(line.split()[1].lstrip("-").split(",")[0]) - 1
            out += source[pos:start]
            pos = start
        elif line.startswith("+"):
            out.append(line[1:])
        else:  # ' ' context or '-' removed: must be the source's next line
            assert source[pos] == line[1:], f"drop_in.diff is stale at source line {pos + 1}: {source[pos]!r}"
            if line.startswith(" "):
                out.append(line[1:])
            pos += 1
    return out + source[pos:]


def test_drop_in_diff_is_current_and_small():
    """examples/drop_in.diff turns the unfused script into the flowkern one, and it is only the two drop-ins."""
    unfused = (EXAMPLES / "sd3_vggflow_unfused.py").read_text().splitlines()
    fused = (EXAMPLES / "sd3_vggflow_flowkern.py").read_text().splitlines()
    diff = (EXAMPLES / "drop_in.diff").read_text().splitlines()
    assert _apply_unified_diff(unfused, diff) == fused, "regenerate: see examples/README.md"
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in diff if line.startswith("-") and not line.startswith("---")]
    calls = [line for line in added if "flowkern." in line]
    assert len(calls) == 2 and "vggflow_matching_loss(" in calls[0] and "truncated_backprop(" in calls[1]
    assert len(added) <= 12 and len(removed) <= 12


def _readme_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    """Every ```python block of the README runs as written (fresh namespace, in a scratch directory)."""
    blocks = _readme_blocks("python")
    assert len(blocks) >= 2, "the README lost its quick-start snippets"
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        namespace = {"__name__": f"readme_snippet_{i}"}
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)
    assert namespace["history"][-1]["reward_mean"] > namespace["history"][0]["reward_mean"]  # the toy run learned


def test_readme_commands_exist_and_parse():
    """The README's two commands are the scripts .ci/run relies on, and every `flowkern ...` line it shows is
    accepted by the CLI's parser (flags, choices, types), without running it."""
    from flowkern.cli import _build_parser

    lines = "\n".join(_readme_blocks("bash")).replace("\\\n", " ").splitlines()
    commands = [shlex.split(line.split(" #")[0]) for line in lines if line.startswith(("flowkern ", "bash "))]
    assert ["bash", "scripts/main.sh"] in commands and ["bash", "scripts/test.sh"] in commands
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    parser = _build_parser()
    shown = [c for c in commands if c[0] == "flowkern"]
    assert {c[1] for c in shown} >= {"demo", "train", "eval", "plot"}
    for command in commands:
        if command[0] == "bash":
            assert (ROOT / command[1]).is_file(), command
        else:
            parser.parse_args(command[1:])  # SystemExit (argparse's error) fails the test
