"""Text prompts -> the embeddings a run conditions on: FLUX.2's text encoder; an on-disk cache for large prompt sets.

Prompts are encoded once, before training, by the pipeline's own text encoders, which are then freed
(`flowkern.app.build._encode_prompts` loads the pipeline without transformer and VAE, encodes every prompt in one
``no_grad`` call and drops it); the run keeps only the embedding table (`PromptBankFlow`).

FLUX.2 (`encode_flux2`): ``Flux2KleinPipeline`` (Qwen3, the hidden states of layers 9/18/27 stacked) or
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

__all__ = ["default_guidance_scale", "encode_cached", "encode_flux2", "encoder_key", "flux2_pipeline_class"]

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


def encode_flux2(
    location: str,
    prompts: Sequence[str],
    *,
    dtype: torch.dtype,
    device: torch.device,
    local_files_only: bool,
    negative: bool,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(rows, shared) of a FLUX.2 prompt table: ``prompt_embeds`` per prompt and, with ``negative`` (true CFG), the
    ``negative_prompt_embeds`` of "" (one row). fp32; the text encoder is freed on return."""
    import diffusers

    name = flux2_pipeline_class(location)
    pipe = None

    def encode(batch: list[str]) -> dict[str, torch.Tensor]:
        nonlocal pipe
        if pipe is None:  # loaded only when something is not cached
            pipe = (
                getattr(diffusers, name)
                .from_pretrained(
                    location, transformer=None, vae=None, torch_dtype=dtype, local_files_only=local_files_only
                )
                .to(device)
            )
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompt=batch, device=device)
        return {"prompt_embeds": embeds.float()}

    key = encoder_key(location, name, dtype)
    rows = encode_cached(list(prompts), encode, cache_dir, key)
    shared = {}
    if negative:
        shared = {"negative_prompt_embeds": encode_cached([""], encode, cache_dir, key)["prompt_embeds"]}
    pipe = None  # free the text encoder before training
    return {k: v.to(device) for k, v in rows.items()}, {k: v.to(device) for k, v in shared.items()}
