"""Prompt tables (flowkern.app.prompts): the stock pipelines' encode_prompt, encoded once, cached on disk."""

from __future__ import annotations

import pytest
import torch

from flowkern.app.prompts import encode_cached, encode_prompts

PROMPTS = ["a cat", "red bird"]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_prompt_tables_equal_the_stock_encode_prompt(kind, tmp_path):
    """SD3 / FLUX.1 rows and the negative "" equal the stock encode_prompt (SD3: its negative_prompt=""), computed
    and then read back from the cache."""
    pytest.importorskip("diffusers")
    if kind == "sd3":
        from tests.test_sd3_adapter import _tiny_pipeline

        pipe = _tiny_pipeline()
        with torch.no_grad():
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
                PROMPTS, None, None, do_classifier_free_guidance=True, negative_prompt=["", ""]
            )
    else:
        from tests.models_tiny_backbones import tiny_flux_pipeline

        pipe = tiny_flux_pipeline()
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None)
            neg, neg_pooled, _ = pipe.encode_prompt([""], None)
    pipe.save_pretrained(tmp_path / "pipe")
    expected = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    expected_neg = {"negative_prompt_embeds": neg[:1], "negative_pooled_prompt_embeds": neg_pooled[:1]}
    kwargs = dict(dtype=torch.float32, device=torch.device("cpu"), local_files_only=True, negative=True)
    for _ in range(2):  # encoded, then from the cache
        rows, shared = encode_prompts(kind, str(tmp_path / "pipe"), PROMPTS, cache_dir=tmp_path / "cache", **kwargs)
        for got, want in ((rows, expected), (shared, expected_neg)):
            assert got.keys() == want.keys()
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3


def test_prompt_cache_encodes_each_prompt_once(tmp_path):
    calls = []

    def encode(batch):
        calls.append(list(batch))
        return {"prompt_embeds": torch.stack([torch.full((3, 2), float(len(p))) for p in batch])}

    first = encode_cached(["ab", "c"], encode, tmp_path, "key")
    again = encode_cached(["c", "xyz", "ab"], encode, tmp_path, "key")
    assert calls == [["ab", "c"], ["xyz"]]
    assert torch.equal(again["prompt_embeds"][[2, 0]], first["prompt_embeds"])
    assert torch.equal(encode_cached(["ab"], encode, None, "key")["prompt_embeds"], first["prompt_embeds"][:1])
    encode_cached(["ab"], encode, tmp_path, "other")  # another encoder: its own entries
    assert calls[-1] == ["ab"]
    file = next((tmp_path / "key").glob("*.safetensors"))
    from safetensors.torch import save_file

    save_file({"prompt_embeds": torch.zeros(3, 2)}, str(file), metadata={"prompt": "tampered"})
    with pytest.raises(ValueError, match="holds another prompt"):
        encode_cached(["ab", "c"], encode, tmp_path, "key")
