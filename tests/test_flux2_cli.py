"""FLUX.2 through ``flowkern train`` / ``eval`` (issue 17) on tiny pipeline directories built from config:
Flux2KleinPipeline (Qwen3 text encoder, true CFG, an int8 base, the prompt cache) and Flux2Pipeline (FLUX.2-dev:
Mistral 3 text encoder, embedded guidance), with the FLUX.2 VAE and conditioning."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flowkern.app.build import load_model  # noqa: E402
from tests.models_tiny_backbones import tiny_flux2_dev_pipeline, tiny_flux2_klein_pipeline  # noqa: E402
from tests.test_cli import run  # noqa: E402

PROMPTS = ["a cat", "red bird"]


def saved(tmp_path_factory, pipeline):
    path = tmp_path_factory.mktemp("flux2") / "pipe"
    pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    return saved(tmp_path_factory, tiny_flux2_klein_pipeline(seed=0))


def test_load_klein_directory_conditions_like_the_stock_pipeline(klein_dir):
    """The prompt table holds the stock encode_prompt's embeddings (and "" as the negative), true CFG w = 4 (the
    non-distilled Klein default), the state is the patchified latent, the reward reads the FLUX.2 VAE's decode."""
    import diffusers

    setup = load_model(str(klein_dir), prompts=PROMPTS, resolution=16, lora_rank=2)
    pipe = diffusers.Flux2KleinPipeline.from_pretrained(klein_dir, transformer=None, vae=None)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPTS)
        negative, _ = pipe.encode_prompt([""])
    cond = setup.model.conditioning(torch.tensor([1, 0]))
    assert setup.kind == "flux2" and setup.guidance_scale == 4.0 and cond.guidance is None
    torch.testing.assert_close(cond.prompt_embeds, embeds[[1, 0]], rtol=0, atol=0)
    torch.testing.assert_close(cond.negative_prompt_embeds, negative.expand(2, -1, -1), rtol=0, atol=0)
    assert setup.sample_shape == (16, 4, 4)  # 16 px / VAE factor 2 / 2x2 patchify; 4 latent channels x 4
    x = torch.randn(2, *setup.sample_shape)
    with torch.no_grad():
        images = setup.to_images(x)
        v = setup.model.velocity(x, torch.tensor(0.5), torch.tensor([0, 1]))
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert v.shape == x.shape and torch.isfinite(v).all()


def train_and_eval(capsys, pipe, out, *extra):
    """One DAM update (K = 1, N = 2) and an eval of its LoRA through the CLI on ``pipe``; both succeed."""
    capsys.readouterr()
    common = ["--model", pipe, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--resolution", "16",
              "--num-steps", "2", "--reward", "brightness", *extra]  # fmt: skip
    rc, _, err = run(
        capsys, "train", *common, "--method", "dam", "--K", "1", "--steps", "1", "--batch-size", "2",
        "--lora-rank", "2", "--eval-samples", "2", "--no-progress", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    rc, stdout, err = run(capsys, "eval", *common, "--lora", out, "--samples", "2")
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["prompts"] == PROMPTS and 0 <= result["tuned"]["reward_mean"] <= 1


def test_train_and_eval_a_klein_directory_with_an_int8_base(klein_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    train_and_eval(capsys, klein_dir, tmp_path / "run", "--base-precision", "int8", "--prompt-cache", cache)
    assert len(list(cache.rglob("*.safetensors"))) == 3  # two prompts and the negative ""


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory):
    return saved(tmp_path_factory, tiny_flux2_dev_pipeline(seed=0))


def test_load_flux2_dev_directory_conditions_like_the_stock_pipeline(dev_dir):
    """Flux2Pipeline: the prompt table holds the stock Mistral 3 encode_prompt's embeddings (layers 10/20/30), no
    true CFG and the embedded guidance 4.0 (the stock default guidance_scale)."""
    import diffusers

    setup = load_model(str(dev_dir), prompts=PROMPTS, resolution=16, lora_rank=2)
    pipe = diffusers.Flux2Pipeline.from_pretrained(dev_dir, transformer=None, vae=None)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPTS)
    cond = setup.model.conditioning(torch.tensor([1, 0]))
    assert setup.kind == "flux2" and setup.guidance_scale is None and cond.negative_prompt_embeds is None
    assert embeds.shape == (2, 512, 48)
    torch.testing.assert_close(cond.prompt_embeds, embeds[[1, 0]], rtol=0, atol=0)
    assert float(cond.guidance) == 4.0
    x = torch.randn(2, *setup.sample_shape)
    with torch.no_grad():
        v = setup.model.velocity(x, torch.tensor(0.5), torch.tensor([0, 1]))
    assert setup.sample_shape == (16, 4, 4) and v.shape == x.shape and torch.isfinite(v).all()


def test_train_and_eval_a_flux2_dev_directory(dev_dir, tmp_path, capsys):
    train_and_eval(capsys, dev_dir, tmp_path / "run")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision loads PixtralProcessor")
def test_flux2_dev_pixtral_processor_without_torchvision_is_one_line(dev_dir, tmp_path, capsys):
    """The real FLUX.2-dev tokenizer is a PixtralProcessor: without torchvision the CLI says so in one line."""
    pipe = tmp_path / "pipe"
    shutil.copytree(dev_dir, pipe)
    index = json.loads((pipe / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    (pipe / "model_index.json").write_text(json.dumps(index))
    (pipe / "tokenizer" / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor"}))
    capsys.readouterr()
    rc, _, err = run(capsys, "train", "--model", pipe, "--prompt", "a cat", "--steps", "1", "--out", tmp_path / "run")
    lines = [line for line in err.splitlines() if line.startswith("flowkern train")]
    assert rc == 2 and len(lines) == 1, err
    assert "PixtralProcessor" in lines[0] and "pip install torchvision" in lines[0]
    assert not (tmp_path / "run" / "log.jsonl").exists()
