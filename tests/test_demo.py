"""The embedded demo model (flowkern/assets/tiny_flow), ``flowkern demo --fast`` and the Pillow plots."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowkern.app.build import ASSET_DIR, PromptBankFlow, load_model
from flowkern.cli import main


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", lora_rank=None, num_steps=8)


def test_shipped_model_is_small_and_complete():
    files = [p for p in ASSET_DIR.rglob("*") if p.is_file()]
    names = {str(p.relative_to(ASSET_DIR)) for p in files}
    assert {
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "prompts.safetensors",
        "flowkern_tiny.json",
    } <= names
    assert sum(p.stat().st_size for p in files) <= 10 * 2**20
    config = json.loads((ASSET_DIR / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel" and config["in_channels"] == 3
    info = json.loads((ASSET_DIR / "flowkern_tiny.json").read_text())
    assert len(info["class_names"]) == 4 and "train_tiny_flow.py" in info["training"]["command"]


def test_shipped_model_draws_its_prompts(tiny):
    """Each prompt's samples carry its colour: the red disk is the reddest class, the blue square the bluest, ..."""
    from flowkern.app.evaluate import generate

    samples = generate(tiny, 16, seed=7, base=True)  # prompts 0, 1, 2, 3, 0, 1, ...
    images, labels = samples.images, samples.labels
    assert images.shape == (16, 3, 16, 16)
    r, g, b = (images[:, c].mean((1, 2)) for c in range(3))
    scores = {  # colour of the shape minus the others, per class (the background is grey)
        0: r - (g + b) / 2,  # a red disk
        1: b - (r + g) / 2,  # a blue square
        2: g - (r + b) / 2,  # green stripes
        3: (r + g) / 2 - b,  # a yellow ring
    }
    for k, score in scores.items():
        mine = score[labels == k].mean()
        others = score[labels != k].mean()
        assert mine > others + 0.05, f"class {k} ({tiny.prompts[k]}): {mine:.3f} vs {others:.3f}"
    # shapes, not flat colour: the red disk's samples have a red blob on a background (high spatial contrast)
    redness = (images[:, 0] - (images[:, 1] + images[:, 2]) / 2)[labels == 0]
    assert (redness.flatten(1).amax(1) - redness.flatten(1).median(1).values).min() > 0.3


def test_prompt_bank_goes_through_the_sd3_adapter(tiny):
    from flowkern.models.sd3 import SD3Conditioning, SD3FlowModel

    model = tiny.model
    assert isinstance(model, PromptBankFlow) and isinstance(model.flow, SD3FlowModel)
    labels = torch.tensor([3, 0, 2])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.5, 0.9])
    cond = SD3Conditioning(
        model.prompt_embeds[labels],
        model.pooled_prompt_embeds[labels],
        model.negative_prompt_embeds.expand(3, -1, -1),
        model.negative_pooled_prompt_embeds.expand(3, -1),
        guidance_scale=model.guidance_scale,
    )
    with torch.no_grad():
        assert torch.equal(model.velocity(x, t, labels), model.flow.velocity(x, t, cond))
    with pytest.raises(TypeError, match="prompt indices"):
        model.velocity(x, t, torch.zeros(3))


def test_demo_fast_writes_the_report_and_raises_the_reward(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--fast", "--out", str(out), "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {
        "reward_curve.png",
        "samples.png",
        "metrics.json",
        "log.jsonl",
        "report.md",
    }
    metrics = json.loads((out / "metrics.json").read_text())
    vgg = metrics["methods"]["vggflow"]
    assert vgg["after"]["reward_mean"] > metrics["before"]["reward_mean"]
    assert vgg["after"]["prior_distance"] > 0 and vgg["after"]["diversity"] > 0
    assert metrics["before"]["prior_distance"] == 0.0  # base vs itself
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == metrics["options"]["steps"] and all(r["method"] == "vggflow" for r in log)
    assert "vggflow: reward" in stdout
    from PIL import Image

    with Image.open(out / "samples.png") as image:
        assert image.width > 8 * 16 * 4 and image.height > 2 * 16 * 4  # 8 samples, base + vggflow rows, 4x upscale
    # `flowkern plot` redraws a demo folder too
    assert main(["plot", str(out)]) == 0
    assert (out / "reward.png").is_file()


def test_line_plot_and_image_grid(tmp_path):
    from PIL import Image

    from flowkern.app.report import image_grid, line_plot, smooth

    path = line_plot(
        {"a": ([0, 1, 2, 3], [0.0, float("nan"), 1.0, 2.0]), "b": ([0], [1.0])},
        tmp_path / "p.png",
        title="t",
        size=(300, 200),
    )
    with Image.open(path) as image:
        assert image.size == (300, 200)
        colours = {colour for _, colour in image.convert("RGB").getcolors(300 * 200)}
        assert (31, 119, 180) in colours  # series 'a' was drawn
    rows = [("base", torch.zeros(3, 3, 4, 4)), ("tuned", torch.ones(2, 3, 4, 4))]
    path = image_grid(rows, tmp_path / "g.png", scale=2, gap=1)
    with Image.open(path) as image:
        w, h = image.size
        rgb = image.convert("RGB")
        assert h == 1 + 2 * (8 + 1)  # two rows of 4 px images at 2x plus gaps
        assert rgb.getpixel((w - 2, h - 3)) == (255, 255, 255)  # white background where row 2 has no 3rd image
        # pixel-exact tiles: row 1 black (zeros), row 2 white (ones), 8 x 8 each, starting after the label column
        x0 = w - 1 - 3 * (8 + 1)  # three tiles and their gaps, then the right margin
        assert {rgb.getpixel((x0 + i, 1 + j)) for i in range(8) for j in range(8)} == {(0, 0, 0)}
        assert {rgb.getpixel((x0 + i, 10 + j)) for i in range(8) for j in range(8)} == {(255, 255, 255)}
        assert rgb.getpixel((x0 - 1, 1)) == (255, 255, 255)  # the gap before the first tile
    assert smooth([1.0, 3.0, float("nan"), 5.0], 2) == [1.0, 2.0, 3.0, 5.0]
    assert math.isnan(smooth([float("nan")], 3)[0])
    with pytest.raises(ValueError, match="at least one row"):
        image_grid([], tmp_path / "x.png")
