"""Checkpoints (layer L6): atomic, verified, exact-resume snapshots of a :class:`flowkern.train.Trainer`.

Layout of a run directory::

    run_dir/
        step-00000010/              one complete checkpoint per saved step (Trainer.step = attempted updates)
            tensors.safetensors     every tensor of Trainer.state_dict(): theta (by parameter name), the value net,
                                    AdamW moments and step counts, RNG states (uint8), method tensors
            trainer_state.json      everything else: format version, fingerprint, config, counters, history,
                                    optimizer hyperparameters, LR scheduler, method state, Python/NumPy RNG
            COMPLETE                written last: format, step, and the byte size + SHA-256 of the two files above
        step-00000020/
        .tmp-step-00000030-<pid>-<random>/   a save in progress (or killed): never read

Writing (:func:`save_checkpoint`) goes into a fresh ``.tmp-*`` directory in the same parent; every file is
fsync'ed, ``COMPLETE`` last, then the directory is renamed to ``step-*`` (``rename(2)`` is atomic within a file
system) and the parent fsync'ed. Older checkpoints are only removed (``keep_last``) after the new one is in place,
so a crash at any moment leaves the previous complete checkpoint. :func:`latest_checkpoint` returns the newest
``step-*`` directory with a valid ``COMPLETE``; :func:`load_checkpoint` re-checks sizes and hashes and refuses a
truncated, corrupt or incompatible checkpoint with a ``ValueError`` naming the file, leaving the trainer untouched.

The state itself (what makes a resume bitwise exact) is :meth:`Trainer.state_dict`; this module only turns a
nested dict of tensors and plain values into files and back (tuples, int-keyed dicts and NaN floats round-trip).
One writer per run directory (with ``accelerate``, the main process).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from flowkern.train.trainer import Trainer

FORMAT = "flowkern-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "trainer_state.json"
MARKER_FILE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_OLD_DIR = re.compile(r"^\.old-(step-\d+)-")


# ---------------------------------------------------------------- public API
def save_checkpoint(trainer: Trainer, directory: str | os.PathLike, *, keep_last: int | None = None) -> Path:
    """Write ``trainer``'s state to ``directory/step-<trainer.step>`` atomically; returns that path.

    ``keep_last``: after the new checkpoint is complete, delete all but the newest ``keep_last`` complete ones
    (None or 0 keeps all). With ``accelerate`` every process must call this (the RNG states are gathered); only the
    main process writes, the others return the same path once it is written.
    """
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0):
        raise ValueError(f"keep_last must be None or an int >= 0, got {keep_last!r}")
    state = trainer.state_dict()  # collective under accelerate
    run_dir = Path(directory)
    final = run_dir / f"step-{trainer.step:08d}"
    processes = trainer.processes
    if processes.is_main:
        try:
            write_state(state, run_dir, final.name)
            if keep_last:
                _prune(run_dir, keep_last)
        finally:
            processes.wait()
    else:
        processes.wait()
    return final


def load_checkpoint(trainer: Trainer, path: str | os.PathLike) -> Path:
    """Restore ``trainer`` from a checkpoint directory, or from a run directory's latest complete checkpoint.

    Raises ValueError (naming the file and the problem) for a missing, incomplete, truncated, corrupt or
    incompatible checkpoint; the trainer is then unchanged. Returns the checkpoint directory that was loaded.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint path {str(path)!r} is not a directory")
    if not (path / MARKER_FILE).exists():
        if (path / TENSORS_FILE).exists() or (path / STATE_FILE).exists() or _STEP_DIR.match(path.name):
            raise ValueError(f"checkpoint {str(path)!r} is incomplete: no {MARKER_FILE} marker (interrupted save?)")
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"no complete checkpoint (step-*/{MARKER_FILE}) in run directory {str(path)!r}")
        path = latest
    state = read_state(path)
    try:
        trainer.load_state_dict(state)
    except ValueError as err:
        raise ValueError(f"checkpoint {str(path)!r}: {err}") from err
    return path


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``step-*`` checkpoint in ``run_dir`` (its ``COMPLETE`` marker parses), or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    for _, path in sorted(_step_dirs(run_dir), reverse=True):
        try:
            _read_marker(path)
        except ValueError:
            continue
        return path
    return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first."""
    out = []
    for _, path in sorted(_step_dirs(Path(run_dir))):
        try:
            _read_marker(path)
        except ValueError:
            continue
        out.append(path)
    return out


# ---------------------------------------------------------------- writing
def write_state(state: dict, run_dir: Path, name: str) -> Path:
    """Encode ``state`` and write it as ``run_dir/name`` (temp dir, fsync, ``COMPLETE`` last, rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _recover(run_dir)
    final = run_dir / name
    tensors: dict[str, torch.Tensor] = {}
    document = _encode(state, (), tensors)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-{os.getpid()}-", dir=run_dir))
    old = None
    try:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        _fsync_file(tmp / TENSORS_FILE)
        _write_json(tmp / STATE_FILE, document)
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in (TENSORS_FILE, STATE_FILE)}
        counters = state.get("counters", {})
        marker = {"format": FORMAT, "version": FORMAT_VERSION, **counters, "files": files}
        _write_json(tmp / MARKER_FILE, marker)  # last: its presence means the files above are complete
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside, swap, then delete it (see _recover)
            old = run_dir / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows): rename durability is the OS's
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _recover(run_dir: Path) -> None:
    """Clean up after a writer killed mid-save: drop ``.tmp-*`` and ``.trash-*``; put back an ``.old-step-*``
    whose swap died before the new directory was renamed into place."""
    for entry in run_dir.iterdir():
        if entry.name.startswith((".tmp-step-", ".trash-step-")) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif (match := _OLD_DIR.match(entry.name)) and entry.is_dir():
            target = run_dir / match.group(1)
            if target.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.replace(entry, target)


def _prune(run_dir: Path, keep_last: int) -> None:
    complete = list_checkpoints(run_dir)
    for path in complete[: max(0, len(complete) - keep_last)]:
        trash = run_dir / f".trash-{path.name}-{os.getpid()}"
        os.replace(path, trash)  # hidden first: a kill during the deletion leaves no half-deleted step-* dir
        shutil.rmtree(trash, ignore_errors=True)


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    if not run_dir.is_dir():
        return []
    out = []
    for entry in run_dir.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            out.append((int(match.group(1)), entry))
    return out


# ---------------------------------------------------------------- reading
def _read_marker(path: Path) -> dict:
    marker_path = path / MARKER_FILE
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{marker_path}: unreadable checkpoint marker ({err})") from err
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("files"), dict):
        raise ValueError(f"{marker_path}: not a {FORMAT} marker")
    version = marker.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{marker_path}: checkpoint format version {version!r}; this flowkern reads versions <= {FORMAT_VERSION}"
        )
    return marker


def read_state(path: str | os.PathLike) -> dict:
    """Verify a checkpoint directory (marker, sizes, SHA-256) and decode its state dict."""
    path = Path(path)
    if not (path / MARKER_FILE).exists():
        raise ValueError(f"checkpoint {str(path)!r} is incomplete: no {MARKER_FILE} marker (interrupted save?)")
    marker = _read_marker(path)
    for name in (TENSORS_FILE, STATE_FILE):
        expected = marker["files"].get(name)
        file = path / name
        if not isinstance(expected, dict):
            raise ValueError(f"{path / MARKER_FILE}: does not list {name}")
        if not file.is_file():
            raise ValueError(f"{file}: missing")
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise ValueError(f"{file}: truncated or corrupt ({size} bytes, {expected.get('bytes')} expected)")
        if _sha256(file) != expected.get("sha256"):
            raise ValueError(f"{file}: corrupt (SHA-256 differs from the one recorded in {MARKER_FILE})")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(path / TENSORS_FILE))
    except Exception as err:  # safetensors raises its own error type on a bad header
        raise ValueError(f"{path / TENSORS_FILE}: unreadable ({err})") from err
    try:
        document = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path / STATE_FILE}: unreadable ({err})") from err
    try:
        state = _decode(document, tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path / STATE_FILE}: malformed ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path / STATE_FILE}: malformed (not a dict)")
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- nested state <-> (JSON document, tensors)
def _encode(obj: Any, path: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = "/".join(path) or "tensor"
        if key in tensors:
            raise ValueError(f"checkpoint: two tensors at {key!r}")
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, (*path, str(i)), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, (*path, str(i)), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, (*path, k), tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, (*path, "key"), {}), _encode(v, (*path, str(k)), tensors)]
                              for k, v in obj.items()]}  # fmt: skip
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {'/'.join(path) or '<root>'}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise KeyError(f"tensor {key!r} is not in {TENSORS_FILE}")
            return tensors[key]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj
