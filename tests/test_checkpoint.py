"""Checkpoints (flowkern.train.checkpoint): bitwise-exact resume, atomic writes under SIGKILL, refusal of bad files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowkern.methods import AdjointMatching, SmallValueNet, VGGFlow, flow_callables
from flowkern.models.toy import GaussianMixture, make_toy_model
from flowkern.train import (
    TrainConfig,
    Trainer,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from flowkern.train import checkpoint as ck

REPO = Path(__file__).resolve().parents[1]


def reward(x):
    return -(x - torch.tensor([1.5, 0.5], dtype=x.dtype)).square().sum(-1) + 4.0


def build(name: str, seed: int = 0, hidden: int = 16) -> Trainer:
    """A small fp32 CPU toy trainer. 'vggflow': value net, quantile clipping, subsampling drawn from the global torch
    RNG, accumulation 2, warm-up + cosine LR; 'am': memoryless AM (noise from the trainer's generator, transitions
    from the method's own generator)."""
    torch.manual_seed(seed)
    model = make_toy_model(GaussianMixture.ring(4, radius=2.0, std=0.5), hidden=hidden, depth=2)
    v, vb = flow_callables(model)
    if name == "vggflow":
        net = SmallValueNet((2,), hidden=16, depth=2)
        torch.nn.init.normal_(net.out.weight, std=0.1)  # non-zero c_phi: the value net's paths matter
        method = VGGFlow(v, vb, reward, beta=1.0, alpha=10.0, value_net=net, subsample_fraction=0.5, clip=True,
                         tau0=1.0)  # fmt: skip
        config = TrainConfig(batch_size=4, grad_accum_steps=2, num_steps=4, lr=1e-2, value_lr=5e-3,
                             lr_schedule="cosine", warmup_updates=1, num_updates=4, residual_probe=2)  # fmt: skip
    elif name == "am":
        generator = torch.Generator().manual_seed(7 + seed)
        method = AdjointMatching(v, vb, reward, beta=1.0, kind="memoryless", n_last=1, n_random=1, generator=generator)
        config = TrainConfig(batch_size=8, num_steps=4, lr=1e-2, lr_schedule="cosine", num_updates=4)
    else:
        raise ValueError(name)
    return Trainer(model, reward, method, config, sample_shape=(2,))


def assert_equal_nested(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_equal_nested(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}/{i}")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def entries(run_dir: Path) -> list[str]:
    """What a run directory holds, besides its lock file."""
    return sorted(name for name in os.listdir(run_dir) if name != ck.lock.LOCK_FILE)


def comparable(trainer: Trainer) -> dict:
    """The trainer's whole state minus wall-clock times."""
    state = trainer.state_dict()
    state["history"] = [{k: v for k, v in h.items() if k != "time_s"} for h in state["history"]]
    return state


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- exact resume
@pytest.mark.parametrize("name", ["vggflow", "am"])
def test_resume_is_bitwise_exact(name, tmp_path):
    n = 4
    straight = build(name)
    straight.train(n)

    first = build(name)
    first.train(n // 2, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    del first
    torch.manual_seed(1234)  # disturb every RNG a resume must restore
    random.seed(5)
    second = build(name, seed=3)  # fresh objects, other initial weights: the checkpoint must overwrite them
    assert load_checkpoint(second, tmp_path) == tmp_path / "step-00000002"
    second.train(n - n // 2)

    a, b = comparable(straight), comparable(second)
    assert_equal_nested(a, b)  # weights, value net, AdamW moments, LR schedule, tau, RNG, history, counters
    assert a["counters"]["updates"] == n and len(a["history"]) == n
    assert a["optimizer"]["state"], "AdamW state must exist"
    if name == "vggflow":
        assert straight.method.tau != 1.0  # (M9) the running quantile moved tau
        assert any(h["clip_fraction"] > 0 for h in straight.history)  # and clipping acted
        assert [g["name"] for g in straight.optimizer.param_groups] == ["theta", "phi"]
    # a differently trained trainer is detectably different (the comparison can fail)
    other = build(name)
    other.train(n - 1)
    with pytest.raises(AssertionError):
        assert_equal_nested(a["model"], comparable(other)["model"])


def test_in_memory_state_dict_round_trip_and_isolation():
    trainer = build("am")  # AM draws only from its own generators (VGG-Flow here also uses the global RNG)
    trainer.train(1)
    state = trainer.state_dict()
    saved_moment = next(iter(state["optimizer"]["state"].values()))["exp_avg"].clone()
    copy = build("am", seed=2)
    copy.load_state_dict(state)
    copy.train(1)  # AdamW updates its moments in place: the caller's state must not change
    assert torch.equal(next(iter(state["optimizer"]["state"].values()))["exp_avg"], saved_moment)
    trainer.train(1)
    assert_equal_nested(comparable(trainer)["model"], comparable(copy)["model"])


# ---------------------------------------------------------------- bad checkpoints are refused, trainer untouched
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    trainer = build("am")
    trainer.train(1)
    return save_checkpoint(trainer, run)


def _copy(path: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(path, dest / path.name)
    return dest / path.name


def _corrupt_truncate(path):
    file = path / ck.TENSORS_FILE
    file.write_bytes(file.read_bytes()[:-100])
    return "tensors.safetensors: truncated"


def _corrupt_flip(path):
    file = path / ck.STATE_FILE
    text = file.read_text()
    file.write_text(text.replace('"updates": 1', '"updates": 7'))
    return "trainer_state.json: corrupt"


def _corrupt_marker(path):
    (path / ck.MARKER_FILE).unlink()
    return "incomplete"


def _corrupt_version(path):
    marker = json.loads((path / ck.MARKER_FILE).read_text())
    marker["version"] = ck.FORMAT_VERSION + 1
    (path / ck.MARKER_FILE).write_text(json.dumps(marker))
    return "version"


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_flip, _corrupt_marker, _corrupt_version])
def test_corrupt_checkpoint_is_refused(saved, tmp_path, corrupt):
    path = _copy(saved, tmp_path)
    message = corrupt(path)
    trainer = build("am", seed=4)
    before = comparable(trainer)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(trainer, path)
    assert_equal_nested(before, comparable(trainer))
    if message in ("incomplete", "version"):  # the marker says so: the newest checkpoint is damaged, never skipped
        with pytest.raises(ck.DamagedCheckpoint, match=message):
            latest_checkpoint(tmp_path)
        assert latest_checkpoint(tmp_path, skip_damaged=True) is None
    else:
        assert latest_checkpoint(tmp_path) == path  # marker-only check; the load verifies the files
    with pytest.raises(ck.DamagedCheckpoint, match=message):  # through the run directory: named, not skipped
        load_checkpoint(trainer, tmp_path)


@pytest.mark.parametrize("make", [lambda: build("am", hidden=32), lambda: build("vggflow")])
def test_incompatible_checkpoint_is_refused(saved, make):
    trainer = make()
    before = comparable(trainer)
    with pytest.raises(ValueError, match="incompatible"):
        load_checkpoint(trainer, saved)
    assert_equal_nested(before, comparable(trainer))


def test_failure_while_applying_rolls_back(saved):
    trainer = build("am", seed=4)
    trainer.train(1)
    before = comparable(trainer)
    state = ck.read_state(saved)
    state["rng"]["processes"][0]["torch"] = torch.zeros(3, dtype=torch.uint8)  # fails after weights are copied
    with pytest.raises(ValueError, match="could not be restored"):
        trainer.load_state_dict(state)
    assert_equal_nested(before, comparable(trainer))


def test_run_dir_resolution_and_pruning(tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        load_checkpoint(build("am"), tmp_path)
    assert latest_checkpoint(tmp_path / "missing") is None
    trainer = build("am")
    trainer.train(5, checkpoint_dir=str(tmp_path), checkpoint_every=2, keep_checkpoints=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert entries(tmp_path) == ["step-00000004", "step-00000005"]  # no temp or trash left
    again = save_checkpoint(trainer, tmp_path)  # re-saving a step swaps the directory
    assert again == latest_checkpoint(tmp_path) and entries(tmp_path)[-1] == "step-00000005"
    fresh = build("am")
    load_checkpoint(fresh, again)
    assert fresh.step == 5 and fresh.updates == 5
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(trainer, tmp_path, keep_last=-1)
    # a writer killed between the two renames of a re-save: every reader first puts the moved-aside step back
    os.replace(tmp_path / "step-00000005", tmp_path / ".old-step-00000005-999")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000005"
    assert entries(tmp_path) == ["step-00000004", "step-00000005"]
    trainer.train(1)
    save_checkpoint(trainer, tmp_path)
    assert entries(tmp_path) == ["step-00000004", "step-00000005", "step-00000006"]
    load_checkpoint(fresh, tmp_path / "step-00000005")
    assert fresh.step == 5


# ---------------------------------------------------------------- SIGKILL during a save
CHILD = r"""
import os, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from tests.test_checkpoint import build
from flowkern.train import save_checkpoint
from flowkern.train import checkpoint as ck
run = {run!r}
trainer = build("am")
trainer.train(1)
save_checkpoint(trainer, run)
if {mode!r} == "stall":
    trainer.train(1)
    def stall(path, obj):  # tensors.safetensors is written, trainer_state.json and COMPLETE are not
        print("PARTIAL", flush=True)
        time.sleep(600)
    ck._write_json = stall
    save_checkpoint(trainer, run)
else:
    print("LOOP", flush=True)
    while True:
        trainer.train_step()
        save_checkpoint(trainer, run, keep_last=2)
"""


def _child(run: Path, mode: str) -> subprocess.Popen:
    code = CHILD.format(repo=str(REPO), run=str(run), mode=mode)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)  # fmt: skip


def _wait_for(proc: subprocess.Popen, word: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if word in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    proc.kill()
    raise AssertionError(f"child did not print {word} in {timeout} s")


def test_sigkill_during_saves(tmp_path):
    """Two writers killed with SIGKILL (started together: interpreter start-up dominates): one stalled inside a
    save after tensors.safetensors was written, one at a random moment of a train/save loop."""
    stalled_run, loop_run = tmp_path / "stalled", tmp_path / "loop"
    stalled, loop = _child(stalled_run, "stall"), _child(loop_run, "loop")
    try:
        _wait_for(loop, "LOOP")
        time.sleep(random.Random(0).uniform(0.5, 1.5))
        os.kill(loop.pid, signal.SIGKILL)
        _wait_for(stalled, "PARTIAL")
        os.kill(stalled.pid, signal.SIGKILL)
    finally:
        for proc in (stalled, loop):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    assert stalled.returncode == loop.returncode == -signal.SIGKILL

    # stalled writer: the partial save is ignored, the previous checkpoint is intact and loads exactly
    partial = [p for p in stalled_run.iterdir() if p.name.startswith(".tmp-step-00000002")]
    assert len(partial) == 1 and (partial[0] / ck.TENSORS_FILE).exists()  # killed in the middle of the save
    assert not (partial[0] / ck.MARKER_FILE).exists()
    assert latest_checkpoint(stalled_run) == stalled_run / "step-00000001"
    resumed = build("am", seed=5)
    load_checkpoint(resumed, stalled_run)
    reference = build("am")
    reference.train(1)
    assert_equal_nested(comparable(reference), comparable(resumed))
    assert entries(stalled_run) == ["step-00000001"]  # the reader cleared the dead writer's temp directory

    # random kill: the newest complete checkpoint loads, whatever the writer was doing
    latest = latest_checkpoint(loop_run)
    assert latest is not None
    resumed = build("am", seed=5)
    assert load_checkpoint(resumed, loop_run) == latest
    assert resumed.step == int(latest.name.split("-")[1]) and len(resumed.history) == resumed.step
