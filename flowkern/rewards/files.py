"""Where reward weights come from (docs/rewards.md): local files and folders load with no network access.

A source that exists on disk, or is written like a path (absolute, ``./``/``~``, or a file name with a
checkpoint suffix), is local: everything it needs (weights, config, tokenizer) is read from disk with
``local_files_only=True``, and a missing piece is a one-line error naming the file and what was expected.
Anything else is a hub id, fetched by transformers / huggingface_hub (cached; ``local_files_only`` honoured).
"""

from __future__ import annotations

import json
import os

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "TOKENIZER_FILES",
    "check_model_dir",
    "check_tokenizer_dir",
    "find_tokenizer_dir",
    "is_local",
    "one_line",
    "require_file",
]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json")
# any one of these makes a folder a tokenizer folder (fast tokenizer, CLIP BPE, BERT WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def is_local(source: object) -> bool:
    """True for a path-like object, an existing path, or a string written like a path (see module doc)."""
    if isinstance(source, os.PathLike):
        return True
    if not isinstance(source, str):
        return False
    return os.path.exists(source) or source.startswith(("/", ".", "~")) or source.lower().endswith(CHECKPOINT_SUFFIXES)


def require_file(path: str | os.PathLike, what: str) -> str:
    """``path`` as a string; FileNotFoundError naming it and ``what`` it should be when it is not a file."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        kind = "is a directory, not a file" if os.path.isdir(path) else "not found"
        raise FileNotFoundError(f"{path}: {kind} (expected {what})")
    return path


def check_model_dir(path: str | os.PathLike, model_type: str, what: str) -> tuple[str, str]:
    """A transformers model folder: ``config.json`` with ``model_type`` and a weights file, else a one-line
    error naming the folder and what was expected. Returns (folder, weights file)."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not found (expected {what})")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{config}: not found (expected {what}: config.json + model.safetensors)")
    try:
        with open(config) as f:
            found = json.load(f).get("model_type")
    except (OSError, ValueError) as err:
        raise ValueError(f"{config}: not a readable JSON config ({type(err).__name__}: {err})") from None
    if found != model_type:
        raise ValueError(f"{config}: model_type {found!r}, expected {model_type!r} ({what})")
    weights = [os.path.join(path, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
    if not weights:
        raise FileNotFoundError(f"{path}: no weights file (expected one of {', '.join(WEIGHT_FILES)}; {what})")
    return path, weights[0]


def check_tokenizer_dir(path: str | os.PathLike, what: str) -> str:
    """A tokenizer folder (one of `TOKENIZER_FILES`), else a one-line FileNotFoundError naming it."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path) or not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        kind = "has no tokenizer files" if os.path.isdir(path) else "not found"
        raise FileNotFoundError(f"{path}: {kind} (expected {what}: one of {', '.join(TOKENIZER_FILES)})")
    return path


def one_line(err: BaseException) -> str:
    """``Type: first line`` of an exception's message (errors here are one line each)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def find_tokenizer_dir(checkpoint: str | os.PathLike) -> str | None:
    """The folder holding ``checkpoint`` or its ``tokenizer/`` subfolder, whichever has tokenizer files."""
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(os.fspath(checkpoint))))
    for candidate in (folder, os.path.join(folder, "tokenizer")):
        if os.path.isdir(candidate) and any(os.path.isfile(os.path.join(candidate, f)) for f in TOKENIZER_FILES):
            return candidate
    return None
