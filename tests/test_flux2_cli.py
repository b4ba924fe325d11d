"""FLUX.2 through ``flowkern train`` / ``eval`` (issue 17) on a tiny Flux2KleinPipeline directory built from config:
its Qwen3 text encoder, the FLUX.2 VAE and conditioning, an int8 base and the prompt cache."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flowkern.app.build import load_model  # noqa: E402
from tests.models_tiny_backbones import tiny_flux2_klein_pipeline  # noqa: E402
from tests.test_cli import run  # noqa: E402

PROMPTS = ["a cat", "red bird"]


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("klein") / "pipe"
    tiny_flux2_klein_pipeline(seed=0).save_pretrained(path)
    return path


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


def test_train_and_eval_a_klein_directory_with_an_int8_base(klein_dir, tmp_path, capsys):
    capsys.readouterr()
    cache = tmp_path / "cache"
    common = ["--model", klein_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--resolution", "16",
              "--num-steps", "2", "--reward", "brightness", "--base-precision", "int8",
              "--prompt-cache", cache]  # fmt: skip
    out = tmp_path / "run"
    rc, _, err = run(
        capsys, "train", *common, "--method", "dam", "--K", "1", "--steps", "1", "--batch-size", "2",
        "--lora-rank", "2", "--eval-samples", "2", "--no-progress", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list(cache.rglob("*.safetensors"))) == 3  # two prompts and the negative ""
    rc, stdout, err = run(capsys, "eval", *common, "--lora", out, "--samples", "2")
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["prompts"] == PROMPTS and 0 <= result["tuned"]["reward_mean"] <= 1
