"""Checkpoints (layer L6): atomic, verified snapshots of a plain nested state dict, crash-safe at every point.

Layout of a run directory::

    run_dir/
        step-00000010/              one complete checkpoint per saved step
            tensors.safetensors     every tensor of the state (theta by parameter name, the value net, AdamW moments,
                                    RNG states as uint8, method tensors)
            trainer_state.json      everything else (tuples, int-keyed dicts and NaN floats round-trip)
            COMPLETE                written last: format, version, counters, byte size + SHA-256 of the two files
        step-00000020/
        .flowkern-lock              the writer's lock (:mod:`flowkern.train.lock`; pid and command of the holder)
        .tmp-step-00000030-<pid>-*  a save in progress, or killed: never read, removed by the next writer
        .old-step-00000020-<pid>    a re-saved step moved aside while its replacement is renamed in (see below)
        .trash-*                    a step being deleted (pruned or replaced): never read, removed
        step-00000040.damaged       a damaged checkpoint set aside on purpose (``skip_damaged``), kept for the user

Writing (:func:`write_state`, under the directory's lock): every file goes into a fresh ``.tmp-*`` directory and is
fsync'ed, ``COMPLETE`` last; the directory is renamed to ``step-*`` (``rename(2)`` is atomic within a file system)
and the parent fsync'ed. Re-saving an existing step (a resumed run that ends where it started, ``--steps`` at or
below the last checkpoint) first moves the old ``step-N`` to ``.old-step-N-<pid>``, renames the new one in, then
deletes the old one; a process killed between the two renames leaves the complete old checkpoint under the
``.old`` name. Every reader and writer first calls :func:`recover`, which puts such a checkpoint back (when no
other process holds the lock; otherwise readers see it under its ``.old`` name), so the last good checkpoint can
always be found. Older checkpoints are pruned (``keep_last``) only after the new one is in place, each renamed to
``.trash-*`` before it is deleted, its ``COMPLETE`` first.

Reading: :func:`latest_checkpoint` / :func:`list_checkpoints` look at the markers; :func:`read_state` re-checks
sizes and hashes; :func:`read_newest` loads the newest checkpoint of a run directory and refuses a damaged one
(missing or garbage ``COMPLETE``, unknown version, truncated or corrupt files) with :class:`DamagedCheckpoint`,
naming the file and the problem, unless ``skip_damaged`` asks to fall back to the previous one on purpose.

This module stores plain nested dicts; what goes into them (what makes a resume bitwise exact) is
:meth:`flowkern.train.Trainer.state_dict`. :data:`fault_hook` lets tests kill the process at every named point of a
save, a prune, a re-save and a recovery (:data:`POINTS`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flowkern.train import lock

__all__ = [
    "DamagedCheckpoint",
    "POINTS",
    "latest_checkpoint",
    "list_checkpoints",
    "read_newest",
    "read_state",
    "recover",
    "write_state",
]

log = logging.getLogger("flowkern.train")

FORMAT = "flowkern-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "trainer_state.json"
MARKER_FILE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_OLD_DIR = re.compile(r"^\.old-step-(\d+)-")
_GARBAGE = (".tmp-step-", ".trash-")

# Named points of a save (in order), of a re-save, of a prune and of a recovery; fault_hook(point) is called at
# each, so a test can end the process there (os._exit) and check what a later resume finds.
POINTS = (
    "save:tmp-created",
    "save:tensors-written",
    "save:state-written",
    "save:marker-written",
    "resave:old-aside",
    "save:renamed",
    "resave:old-trashed",
    "resave:old-deleting",
    "prune:step-trashed",
    "prune:step-deleting",
    "recover:restoring",
)
fault_hook: Callable[[str], None] | None = None


def _reached(point: str) -> None:
    if fault_hook is not None:
        fault_hook(point)


class DamagedCheckpoint(ValueError):
    """The newest checkpoint of a run directory cannot be used: ``path``, ``problem``; ``previous`` is the newest
    older checkpoint whose marker is valid (None if there is none)."""

    def __init__(self, path: Path, problem: str, previous: Path | None):
        self.path, self.problem, self.previous = path, problem, previous
        fallback = f"; skip_damaged=True falls back to {previous.name}" if previous is not None else ""
        super().__init__(f"the newest checkpoint {path} is damaged: {problem}{fallback}")


# ---------------------------------------------------------------- writing
def write_state(state: dict, run_dir: str | os.PathLike, step: int, *, keep_last: int | None = None) -> Path:
    """Write ``state`` as ``run_dir/step-<step>`` (temp dir, fsync, ``COMPLETE`` last, rename); returns that path.

    Holds the directory's lock while writing (:class:`flowkern.train.lock.RunDirectoryBusy` if another process
    holds it). ``keep_last``: afterwards delete all but the newest ``keep_last`` complete checkpoints (None or 0
    keeps all).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0):
        raise ValueError(f"keep_last must be None or an int >= 0, got {keep_last!r}")
    run_dir = Path(run_dir)
    tensors: dict[str, torch.Tensor] = {}
    document = _encode(state, (), tensors)  # before touching the disk: an unstorable state fails cleanly
    run_dir.mkdir(parents=True, exist_ok=True)
    with lock.hold(run_dir, what="checkpoint directory"):
        _recover(run_dir)
        final = _write(run_dir, f"step-{step:08d}", tensors, document, state.get("counters", {}))
        if keep_last:
            _prune(run_dir, keep_last)
    return final


def _write(run_dir: Path, name: str, tensors: dict, document: Any, counters: dict) -> Path:
    final = run_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-{os.getpid()}-", dir=run_dir))
    old = None
    try:
        _reached("save:tmp-created")
        _save_tensors(tensors, tmp / TENSORS_FILE)
        _fsync_file(tmp / TENSORS_FILE)
        _reached("save:tensors-written")
        _write_json(tmp / STATE_FILE, document)
        _reached("save:state-written")
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in (TENSORS_FILE, STATE_FILE)}
        marker = {"format": FORMAT, "version": FORMAT_VERSION, **counters, "files": files}
        _write_json(tmp / MARKER_FILE, marker)  # last: its presence means the files above are complete
        _fsync_dir(tmp)
        _reached("save:marker-written")
        if final.exists():  # a re-save: the old step goes aside until the new one is in place
            old = run_dir / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            _fsync_dir(run_dir)
            _reached("resave:old-aside")
        os.replace(tmp, final)
        _fsync_dir(run_dir)
        _reached("save:renamed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)
        raise
    if old is not None:
        _discard(run_dir, old, "resave:old")
    return final


def _save_tensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """safetensors' writer; its I/O errors (a full disk, a file-size limit) become the OSError they are."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(file), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
    except OSError:
        raise
    except Exception as err:  # SafetensorError "Error while serializing: I/O error: ... (os error 28)"
        match = re.search(r"os error (\d+)", str(err))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(file)) from err


def _discard(run_dir: Path, path: Path, point: str) -> None:
    """Delete a checkpoint directory: renamed to ``.trash-*`` first (never read), its marker removed first."""
    trash = Path(tempfile.mkdtemp(prefix=f".trash-{path.name.lstrip('.')}-{os.getpid()}-", dir=run_dir))
    os.replace(path, trash)  # a directory renamed onto an empty directory replaces it
    _reached(f"{point}-trashed")
    (trash / MARKER_FILE).unlink(missing_ok=True)
    _reached(f"{point}-deleting")
    shutil.rmtree(trash, ignore_errors=True)


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


def _prune(run_dir: Path, keep_last: int) -> None:
    complete = list_checkpoints(run_dir)
    for path in complete[: max(0, len(complete) - keep_last)]:
        _discard(run_dir, path, "prune:step")


# ---------------------------------------------------------------- recovery
def recover(run_dir: str | os.PathLike) -> None:
    """Undo what a writer killed mid-save left: put back a checkpoint moved aside by an interrupted re-save, drop
    temporary and trash directories. Only when no other process holds the directory (a live writer's files are
    its own); called by every reader and writer of this module."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(_is_leftover(e.name) for e in run_dir.iterdir()):
        return
    with lock.try_hold(run_dir) as held:
        if held:
            _recover(run_dir)


def _is_leftover(name: str) -> bool:
    return name.startswith(_GARBAGE) or _OLD_DIR.match(name) is not None


def _recover(run_dir: Path) -> None:
    """:func:`recover` with the lock held."""
    for entry in sorted(run_dir.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name.startswith(_GARBAGE):
            shutil.rmtree(entry, ignore_errors=True)
        elif match := _OLD_DIR.match(entry.name):
            target = run_dir / f"step-{match.group(1)}"
            if _marker_problem(target) is None or _marker_problem(entry) is not None:
                shutil.rmtree(entry, ignore_errors=True)  # the swap finished (or the aside copy is no good)
                continue
            _reached("recover:restoring")
            if target.exists():  # a damaged step-N: kept for the user, out of the way
                os.replace(target, _damaged_name(target))
            os.replace(entry, target)
            _fsync_dir(run_dir)
            log.warning("flowkern.train: restored %s, left aside by an interrupted re-save", target)


def _damaged_name(path: Path) -> Path:
    candidate, k = path.with_name(f"{path.name}.damaged"), 1
    while candidate.exists():
        candidate, k = path.with_name(f"{path.name}.damaged-{k}"), k + 1
    return candidate


def _checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint, oldest first: ``step-N``, or the ``.old-step-N-*`` a live writer
    (or an unwritable directory) keeps aside when there is no ``step-N``."""
    if not run_dir.is_dir():
        return []
    steps: dict[int, Path] = {}
    aside: dict[int, Path] = {}
    for entry in run_dir.iterdir():
        if (match := _STEP_DIR.match(entry.name)) and entry.is_dir():
            steps[int(match.group(1))] = entry
        elif (match := _OLD_DIR.match(entry.name)) and entry.is_dir() and _marker_problem(entry) is None:
            aside[int(match.group(1))] = entry
    return sorted({**aside, **steps}.items())


# ---------------------------------------------------------------- reading
def latest_checkpoint(run_dir: str | os.PathLike, *, skip_damaged: bool = False) -> Path | None:
    """The newest checkpoint of ``run_dir``, None if it has none. A newest checkpoint whose ``COMPLETE`` marker is
    missing or unreadable is :class:`DamagedCheckpoint`, unless ``skip_damaged`` (then the newest valid one)."""
    run_dir = Path(run_dir)
    recover(run_dir)
    dirs = _checkpoint_dirs(run_dir)
    for i, (_, path) in enumerate(reversed(dirs)):
        problem = _marker_problem(path)
        if problem is None:
            return path
        if not skip_damaged and i == 0:
            raise DamagedCheckpoint(path, problem, _newest_valid(dirs[:-1]))
    return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of ``run_dir`` with a valid ``COMPLETE`` marker, oldest first."""
    run_dir = Path(run_dir)
    recover(run_dir)
    return [path for _, path in _checkpoint_dirs(run_dir) if _marker_problem(path) is None]


def _newest_valid(dirs: list[tuple[int, Path]]) -> Path | None:
    return next((path for _, path in reversed(dirs) if _marker_problem(path) is None), None)


def _is_checkpoint_dir(path: Path) -> bool:
    """A checkpoint directory (rather than a run directory of them)."""
    names = (MARKER_FILE, TENSORS_FILE, STATE_FILE)
    return any((path / f).exists() for f in names) or bool(_STEP_DIR.match(path.name) or _OLD_DIR.match(path.name))


def read_newest(
    path: str | os.PathLike, *, skip_damaged: bool = False, tensors: bool = True, set_aside: bool = True
) -> tuple[Path, dict]:
    """(checkpoint directory, decoded state) of ``path``: a checkpoint directory, or a run directory's newest
    checkpoint. A damaged newest checkpoint is :class:`DamagedCheckpoint` (naming the file and the problem); with
    ``skip_damaged`` the previous one is read, and (``set_aside``) the damaged one renamed ``step-N.damaged`` (kept
    for the user, out of the way of later resumes)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint path {str(path)!r} is not a directory")
    if _is_checkpoint_dir(path):
        return path, read_state(path, tensors=tensors)
    recover(path)
    dirs = _checkpoint_dirs(path)
    if not dirs:
        raise ValueError(f"no complete checkpoint (step-*/{MARKER_FILE}) in run directory {str(path)!r}")
    while dirs:
        _, newest = dirs.pop()
        try:
            return newest, read_state(newest, tensors=tensors)
        except ValueError as err:
            if not skip_damaged:
                raise DamagedCheckpoint(newest, str(err), _newest_valid(dirs)) from None
            if set_aside:
                _set_aside(path, newest, str(err))
    raise ValueError(f"no undamaged checkpoint in run directory {str(path)!r}")


def _set_aside(run_dir: Path, path: Path, problem: str) -> None:
    with lock.try_hold(run_dir) as held:
        if held and _STEP_DIR.match(path.name):
            target = _damaged_name(path)
            os.replace(path, target)
            log.warning("flowkern.train: damaged checkpoint moved to %s (%s)", target, problem)
        else:
            log.warning("flowkern.train: skipping damaged checkpoint %s (%s)", path, problem)


def _marker_problem(path: Path) -> str | None:
    try:
        _read_marker(path)
    except ValueError as err:
        return str(err)
    return None


def _read_marker(path: Path) -> dict:
    marker_path = path / MARKER_FILE
    if not marker_path.is_file():
        raise ValueError(f"{marker_path}: missing (the checkpoint is incomplete or damaged)")
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{marker_path}: unreadable checkpoint marker ({err})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("files"), dict):
        raise ValueError(f"{marker_path}: not a {FORMAT} marker")
    version = marker.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{marker_path}: unknown checkpoint format version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{marker_path}: checkpoint format version {version} (a newer flowkern); this one reads <= {FORMAT_VERSION}"
        )
    return marker


def read_state(path: str | os.PathLike, *, tensors: bool = True) -> dict:
    """Verify a checkpoint directory (marker, sizes, SHA-256) and decode its state dict. ``tensors=False`` checks
    and decodes the JSON part only (tensors become None): the settings of a checkpoint without reading its weights."""
    path = Path(path)
    marker = _read_marker(path)
    for name in (TENSORS_FILE, STATE_FILE) if tensors else (STATE_FILE,):
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
    loaded: dict[str, torch.Tensor] | None = None
    if tensors:
        try:
            from safetensors.torch import load_file

            loaded = load_file(str(path / TENSORS_FILE))
        except Exception as err:  # safetensors raises its own error type on a bad header
            raise ValueError(f"{path / TENSORS_FILE}: unreadable ({err})") from None
    try:
        document = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path / STATE_FILE}: unreadable ({err})") from None
    try:
        state = _decode(document, loaded)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path / STATE_FILE}: malformed ({err})") from None
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


def _decode(obj: Any, tensors: dict[str, torch.Tensor] | None) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if tensors is None:
                return None
            if key not in tensors:
                raise KeyError(f"tensor {key!r} is not in {TENSORS_FILE}")
            return tensors[key]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj
