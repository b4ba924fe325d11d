"""Text prompts -> the embeddings a run conditions on (SD3, FLUX.1, FLUX.2); an on-disk cache for large prompt sets.

`encode_prompts` encodes every prompt once, before training, with the pipeline's own text encoders (the pipeline
loaded without transformer and VAE, ``no_grad``), then frees them; the run keeps only the embedding table
(`PromptBankFlow`). This was already so for SD3 and FLUX.1 (issue 17 asked); the cache is new.

FLUX.2: ``Flux2KleinPipeline`` (Qwen3, the hidden states of layers 9/18/27 stacked) or
``Flux2Pipeline`` (Mistral 3, layers 10/20/30) by the directory's ``model_index.json``; ``encode_prompt`` pads to its
512 tokens. True CFG's negative prompt is "" as in the stock pipelines. `default_guidance_scale`: the stock default,
w = 4 for non-distilled Klein (``is_distilled`` false), none otherwise (distilled Klein; FLUX.2-dev embeds guidance).

Cache (`encode_cached`): one safetensors file per prompt under ``cache_dir/<encoder key>/``, named by the prompt's
SHA-256 and holding the prompt text in its metadata (checked on read). The encoder key hashes what determines the
embedding: the pipeline class, the text encoder's and tokenizer's config files, the names, sizes and mtimes of the
encoder's weight files, and the dtype. A second run encodes only the prompts not yet cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["default_guidance_scale", "encode_cached", "encode_prompts", "encoder_key", "flux2_pipeline_class"]

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}  # FLUX.2: by model_index.json
FLUX2_PIPELINES = ("Flux2KleinPipeline", "Flux2Pipeline")


def _model_index(location: str) -> dict:
    file = Path(location) / "model_index.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not readable JSON ({err})") from None


def flux2_pipeline_class(location: str) -> str:
    """'Flux2KleinPipeline' or 'Flux2Pipeline' from ``model_index.json`` (Klein when there is none: a hub id)."""
    name = _model_index(location).get("_class_name", "Flux2KleinPipeline")
    if name not in FLUX2_PIPELINES:
        raise ValueError(f"{location}: a FLUX.2 transformer in a {name}; supported: {', '.join(FLUX2_PIPELINES)}")
    return name


def _check_processor(location: str, pipeline: str) -> None:
    """FLUX.2-dev ships its tokenizer as a ``PixtralProcessor``, which transformers (5.x) builds only with torchvision;
    without it diffusers' loader fails with a long message about loading methods. One line instead."""
    import importlib.util

    tokenizer = (_model_index(location).get("tokenizer") or [None])[-1]
    if pipeline == "Flux2Pipeline" and tokenizer == "PixtralProcessor" and not importlib.util.find_spec("torchvision"):
        raise ValueError(
            f"{location}: the Flux2Pipeline tokenizer is a PixtralProcessor, which transformers loads only with "
            f"torchvision: pip install torchvision (the build matching torch {torch.__version__})"
        )


def default_guidance_scale(location: str) -> float | None:
    """The stock pipeline's true-CFG w: 4.0 for non-distilled Klein, None for distilled Klein and FLUX.2-dev."""
    index = _model_index(location)
    klein = index.get("_class_name", "Flux2KleinPipeline") == "Flux2KleinPipeline"
    return 4.0 if klein and not index.get("is_distilled", False) else None


def encoder_key(location: str, pipeline: str, dtype: torch.dtype, parts: Sequence[str] = ("text_encoder", "tokenizer")):
    """A hex digest of what determines the embeddings (see the module docstring); a hub id hashes its name."""
    h = hashlib.sha256(
        f"{pipeline}|{dtype}|{os.path.abspath(location) if Path(location).is_dir() else location}".encode()
    )
    for part in parts:
        folder = Path(location) / part
        if not folder.is_dir():
            continue
        for file in sorted(folder.iterdir()):
            if file.suffix in (".json", ".txt", ".model", ".jinja"):
                h.update(file.name.encode() + file.read_bytes())
            elif file.is_file():
                stat = file.stat()
                h.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def encode_cached(
    prompts: Sequence[str],
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    cache_dir: str | os.PathLike | None,
    key: str,
) -> dict[str, torch.Tensor]:
    """Per-prompt rows {name: [len(prompts), ...]}: cached prompts read from ``cache_dir/key``, the others encoded by
    one ``encode(missing)`` call (same dict layout, rows in order) and written there. No ``cache_dir``: encode all."""
    if cache_dir is None:
        return encode(list(prompts))
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(cache_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    files = {p: folder / f"{hashlib.sha256(p.encode()).hexdigest()}.safetensors" for p in prompts}
    rows: dict[str, dict[str, torch.Tensor]] = {}
    for prompt, file in files.items():
        if not file.is_file():
            continue
        with safe_open(str(file), framework="pt") as f:
            if (f.metadata() or {}).get("prompt") != prompt:
                raise ValueError(f"prompt cache {file} holds another prompt: delete it")
            rows[prompt] = {name: f.get_tensor(name) for name in f.keys()}
    missing = list(dict.fromkeys(p for p in prompts if p not in rows))
    if missing:
        fresh = encode(missing)
        for i, prompt in enumerate(missing):
            rows[prompt] = {name: value[i].detach().cpu().contiguous() for name, value in fresh.items()}
            save_file(rows[prompt], str(files[prompt]), metadata={"prompt": prompt})
    names = rows[prompts[0]].keys()
    return {name: torch.stack([rows[p][name] for p in prompts]) for name in names}


def encode_prompts(
    kind: str,
    location: str,
    prompts: Sequence[str],
    *,
    dtype: torch.dtype,
    device: torch.device,
    local_files_only: bool,
    negative: bool,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(rows, shared) of the prompt table of an 'sd3', 'flux' or 'flux2' pipeline: per prompt ``prompt_embeds`` (and
    ``pooled_prompt_embeds`` for SD3 / FLUX.1) from the stock ``encode_prompt``; with ``negative`` (true CFG, M5) the
    same of "" as ``negative_*`` (one row). fp32 on ``device``. The pipeline (text encoders only) is loaded only if
    some prompt is not in the cache, and freed on return."""
    import diffusers

    name = flux2_pipeline_class(location) if kind == "flux2" else PIPELINES[kind]
    pipe = None

    def encode(batch: list[str]) -> dict[str, torch.Tensor]:
        nonlocal pipe
        if pipe is None:
            _check_processor(location, name)
            pipe = (
                getattr(diffusers, name)
                .from_pretrained(
                    location, transformer=None, vae=None, torch_dtype=dtype, local_files_only=local_files_only
                )
                .to(device)
            )
        with torch.no_grad():
            if kind == "sd3":  # "" as a prompt is the stock negative_prompt="" (the same encoders and lengths)
                embeds, _, pooled, _ = pipe.encode_prompt(
                    prompt=batch, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False
                )
            elif kind == "flux":
                embeds, pooled, _ = pipe.encode_prompt(prompt=batch, prompt_2=None, device=device)
            else:
                (embeds, _), pooled = pipe.encode_prompt(prompt=batch, device=device), None
        out = {"prompt_embeds": embeds.float()}
        if pooled is not None:
            out["pooled_prompt_embeds"] = pooled.float()
        return out

    key = encoder_key(location, name, dtype)
    rows = encode_cached(list(prompts), encode, cache_dir, key)
    shared = {}
    if negative:
        shared = {f"negative_{k}": v for k, v in encode_cached([""], encode, cache_dir, key).items()}
    pipe = None  # free the text encoders before training
    return {k: v.to(device) for k, v in rows.items()}, {k: v.to(device) for k, v in shared.items()}
