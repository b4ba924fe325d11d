"""Runs that never lose work (issue 20): kills at every point of a save, prune, re-save and recovery; one writer per
run directory; strict resume; damaged checkpoints; one-line errors for bad input and a hostile environment.

The 2-D toy through ``flowkern.cli.main`` in-process (a few updates take about a second). A killed writer is a forked
child that ends with ``os._exit`` at a named point of the checkpoint code (``checkpoint.fault_hook``): no cleanup
runs, as under SIGKILL (tests/test_checkpoint.py and scripts/soak_resume.py kill with real signals).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowkern.cli import main
from flowkern.train import checkpoint as ck
from flowkern.train import latest_checkpoint, load_checkpoint, lock, save_checkpoint
from tests.test_checkpoint import _one_thread, assert_equal_nested, build, comparable, entries  # noqa: F401
from tests.test_cli import TOY, one_error_line, run, tree

KILLED = 86  # exit status of a child ended at a fault point
RUN = [*TOY, "--checkpoint-every", "1", "--keep-checkpoints", "2"]


def fork(job, point: str | None = None, occurrence: int = 1) -> int:
    """Run ``job()`` in a forked child; with ``point``, the child dies (``os._exit(KILLED)``, no cleanup) the
    ``occurrence``-th time the checkpoint code reaches it. Returns the child's pid (see :func:`reap`)."""
    pid = os.fork()
    if pid:
        return pid
    status = 0
    try:
        torch.set_num_threads(1)
        seen = [0]

        def hook(name: str) -> None:
            if name == point:
                seen[0] += 1
                if seen[0] == occurrence:
                    os._exit(KILLED)

        ck.fault_hook = hook
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            job()
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def reap(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def outputs(run_dir: Path) -> dict:
    """What a finished run produced: the LoRA (toy residual), the value net, the log without wall-clock times."""
    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return {
        "lora": load_file(run_dir / "lora" / "toy_residual.safetensors"),
        "value_net": load_file(run_dir / "value_net.safetensors"),
        "log": [{k: v for k, v in r.items() if k != "time_s"} for r in log],
    }


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 4-update VGG-Flow toy run (checkpoint every update, keep 2): what every resume must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", *RUN, "--steps", "4", "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------- 1. kills at every point, then --resume
CLI_POINTS = [  # (point, occurrence): the third save (older checkpoints exist; with keep 2 it prunes step 1)
    *[(p, 3) for p in ("save:tmp-created", "save:tensors-written", "save:state-written", "save:marker-written",
                       "save:renamed")],
    ("prune:step-trashed", 1),
    ("prune:step-deleting", 1),
]  # fmt: skip


def test_kill_at_every_point_of_save_and_prune_then_resume_is_bit_exact(straight, tmp_path, capsys):
    runs = {point: tmp_path / point.replace(":", "_") for point, _ in CLI_POINTS}
    children = [  # all killed writers at once (each one thread), then the resumes
        fork(lambda out=runs[p]: main(["train", *RUN, "--steps", "4", "--out", str(out)]), p, k) for p, k in CLI_POINTS
    ]
    assert [reap(pid) for pid in children] == [KILLED] * len(children)
    expected = outputs(straight)
    for point, out in runs.items():
        newest = "step-00000003" if point.startswith(("prune", "save:renamed")) else "step-00000002"
        rc, stdout, err = run(capsys, "train", "--out", out, "--resume", "--no-progress")  # the short form
        assert rc == 0, f"{point}: {err}"
        assert f"resumed from {out / 'checkpoints' / newest} " in stdout, point  # the newest complete checkpoint
        assert_equal_nested(expected, outputs(out), point)  # weights, value net, every logged update once
        assert entries(out / "checkpoints") == ["step-00000003", "step-00000004"], point  # nothing left over


RESAVE_POINTS = ["save:tmp-created", "save:tensors-written", "save:state-written", "save:marker-written",
                 "resave:old-aside", "save:renamed", "resave:old-trashed", "resave:old-deleting"]  # fmt: skip


def test_kill_at_every_point_of_a_resave_keeps_the_last_good_checkpoint(tmp_path):
    """Re-saving an existing step (here step 2 again, after resuming from step 1), killed at every point: the step
    is found (put back if it was aside), loads, and the run continues bit-exactly. keep_last=1 (the issue's case)."""
    reference = build("am")
    reference.train(4)
    base = tmp_path / "base"
    first = build("am")
    first.train(2, checkpoint_dir=base, checkpoint_every=1)  # step-1, step-2

    def resave(run_dir: Path) -> None:
        trainer = build("am", seed=3)
        load_checkpoint(trainer, run_dir / "step-00000001")
        trainer.train(1)
        save_checkpoint(trainer, run_dir, keep_last=1)

    runs = {point: tmp_path / point.replace(":", "_") for point in RESAVE_POINTS}
    for out in runs.values():
        shutil.copytree(base, out)
    children = [fork(lambda out=runs[p]: resave(out), p) for p in RESAVE_POINTS]
    assert [reap(pid) for pid in children] == [KILLED] * len(children)
    assert any(p.name.startswith(".old-step-00000002") for p in runs["resave:old-aside"].iterdir())  # step-2 hidden
    for point, out in runs.items():
        assert latest_checkpoint(out) == out / "step-00000002", point  # found (restored), never a silent fallback
        assert not [p for p in entries(out) if p.startswith(".")], point  # no temp, trash or aside left
        resumed = build("am", seed=5)
        assert load_checkpoint(resumed, out) == out / "step-00000002"
        resumed.train(2)
        assert_equal_nested(comparable(reference)["model"], comparable(resumed)["model"], point)
        assert_equal_nested(comparable(reference)["rng"], comparable(resumed)["rng"], point)


def test_kill_while_recovering_and_readers_of_a_live_writer(tmp_path):
    run_dir = tmp_path / "run"
    trainer = build("am")
    trainer.train(2, checkpoint_dir=run_dir, checkpoint_every=1)
    aside = run_dir / ".old-step-00000002-4242"
    os.replace(run_dir / "step-00000002", aside)  # as a writer killed between the two renames leaves it
    assert reap(fork(lambda: latest_checkpoint(run_dir), "recover:restoring")) == KILLED  # killed mid-recovery
    with lock.hold(run_dir):  # while a live writer holds the directory, readers see the aside step, move nothing
        pid = fork(lambda: os._exit(0 if latest_checkpoint(run_dir) == aside else 3))
        assert reap(pid) == 0
        assert aside.is_dir()
    assert latest_checkpoint(run_dir) == run_dir / "step-00000002"  # the next free reader puts it back
    assert entries(run_dir) == ["step-00000001", "step-00000002"]


# ---------------------------------------------------------------- 2. one writer per run directory
def _hold(run_dir: Path):
    """A forked process holding ``run_dir``'s lock until killed; returns its pid once it holds it."""
    read, write = os.pipe()

    def job():
        with lock.hold(run_dir):
            os.write(write, b"1")
            time.sleep(120)

    pid = fork(job)
    assert os.read(read, 1) == b"1"
    os.close(read), os.close(write)
    return pid


def test_second_writer_is_refused_naming_the_first(straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    holder = _hold(out)
    try:
        before = tree(out)
        for argv in (
            ["train", *RUN, "--steps", "6", "--out", out, "--resume"],
            ["train", *RUN, "--steps", "2", "--out", out, "--overwrite"],
            ["train", *RUN, "--steps", "2", "--out", out],
            ["demo", "--fast", "--no-progress", "--out", out],
        ):
            rc, _, err = run(capsys, *argv)
            assert rc == 2, argv
            one_error_line(err, "is in use by process", str(holder), "pytest")  # pid and command of the holder
            assert tree(out) == before, argv
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        holder2 = _hold(fresh)
        rc, _, err = run(capsys, "train", *RUN, "--steps", "1", "--out", fresh)
        assert rc == 2 and fresh.is_dir()  # refused; the other process's directory stays
        os.kill(holder2, signal.SIGKILL), reap(holder2)
    finally:
        os.kill(holder, signal.SIGKILL)
        reap(holder)
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--steps", "5", "--no-progress")
    assert rc == 0, err  # a killed holder's lock is gone with it (its lock file may stay)


def test_demo_refuses_a_training_run(straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = tree(out)
    rc, _, err = run(capsys, "demo", "--fast", "--no-progress", "--out", out)
    assert rc == 2
    one_error_line(err, "already holds a run", "run_config.json")
    assert tree(out) == before  # log.jsonl not truncated


# ---------------------------------------------------------------- 3. strict resume
def test_resume_refuses_changed_settings_and_allows_steps_and_allowed_changes(straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / "run_config.json").unlink()  # the checkpoint itself is the authority
    before = tree(out)
    for flags, key in (
        (["--alpha", "5"], "alpha"),
        (["--subsample", "0.5"], "subsample"),
        (["--consistency", "exact"], "consistency"),
        (["--lr", "1e-3"], "lr"),
        (["--batch-size", "2"], "batch_size"),
        (["--seed", "3"], "seed"),
        (["--method", "dam"], "method"),
        (["--reward", "bump:2"], "reward"),
    ):
        rc, _, err = run(capsys, "train", "--out", out, "--resume", "--steps", "6", *flags)
        assert rc == 2, flags
        one_error_line(err, "other settings", key, "step-00000004")
        assert tree(out) == before
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--allow-change", "beta")
    assert rc == 2 and "invalid choice" in err
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--steps", "6", "--lr", "1e-3", "--allow-change", "lr",
                     "--no-progress")  # fmt: skip
    assert rc == 0, err
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4, 5]
    assert [r["lr"] for r in log] == [5e-4] * 4 + [1e-3] * 2  # the allowed change took effect


def test_short_form_resume_extends_a_run_bit_exactly(straight, tmp_path, capsys):
    longer = tmp_path / "longer"
    assert run(capsys, "train", *RUN, "--steps", "6", "--out", longer)[0] == 0
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--steps", "6", "--no-progress")
    assert rc == 0, err
    assert_equal_nested(outputs(longer), outputs(out))
    saved = tree(out / "checkpoints")  # --steps at or below the last checkpoint: nothing to train, nothing re-saved
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--steps", "3", "--no-progress")
    assert rc == 0, err
    assert tree(out / "checkpoints") == saved


def test_python_api_resume_compares_method_kind_and_settings(tmp_path):
    from flowkern.methods import AdjointMatching, flow_callables
    from flowkern.models.toy import GaussianMixture, make_toy_model
    from flowkern.train import TrainConfig, Trainer

    def trainer(kind="ode", lr=1e-2):
        torch.manual_seed(0)
        model = make_toy_model(GaussianMixture.ring(4, radius=2.0, std=0.5), hidden=16, depth=2)
        v, vb = flow_callables(model)
        reward = lambda x: -x.square().sum(-1)
        method = AdjointMatching(v, vb, reward, beta=1.0, kind=kind, n_last=1, n_random=1,
                                 generator=torch.Generator().manual_seed(1))  # fmt: skip
        return Trainer(model, reward, method, TrainConfig(batch_size=4, num_steps=4, lr=lr), sample_shape=(2,))

    deterministic = trainer()
    deterministic.train(1, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"method\.kind: 'ode' -> 'memoryless'"):
        load_checkpoint(trainer("memoryless"), tmp_path)  # the same class, another method
    with pytest.raises(ValueError, match=r"config\.lr: 0\.01 -> 0\.002"):
        load_checkpoint(trainer(lr=2e-3), tmp_path)
    changed = trainer(lr=2e-3)
    load_checkpoint(changed, tmp_path, allow_changes=["config.lr"])
    assert [g["lr"] for g in changed.optimizer.param_groups] == [2e-3]  # applied, not the checkpoint's
    settings = deterministic.settings()
    assert settings["method.kind"] == "ode" and settings["method.beta"] == 1.0 and settings["config.lr"] == 1e-2


def test_sd3_settings_record_lora_alpha_precision_and_resolution():
    """What the toy cannot show: LoRA rank/alpha, frozen weights' dtype (precision) and sample shape (resolution)."""
    from flowkern.app.build import MethodSettings, load_model, method_for_run, reward_for_run
    from flowkern.train import TrainConfig, Trainer

    def settings(**kw):
        setup = load_model("tiny", num_steps=2, **{"lora_rank": 2, **kw})
        reward_fn, _ = reward_for_run(["redness"], setup)
        method = method_for_run("draft", setup, reward_fn, MethodSettings(K=1))
        config = TrainConfig(batch_size=1, num_steps=2)
        return Trainer(setup.model, reward_fn, method, config, sample_shape=setup.sample_shape).settings()

    base = settings()
    assert base["model.lora.default"]["r"] == 2 and base["model.lora.default"]["lora_alpha"] == 2.0
    assert settings(lora_alpha=4.0)["model.lora.default"]["lora_alpha"] == 4.0
    assert settings(precision="bf16")["model.frozen_dtypes"] != base["model.frozen_dtypes"]
    assert settings(resolution=32)["sample_shape"] != base["sample_shape"]


# ---------------------------------------------------------------- damaged newest checkpoint
def _no_marker(path: Path):
    (path / "COMPLETE").unlink()


def _garbage_marker(path: Path):
    (path / "COMPLETE").write_bytes(b"\x00garbage")


def _future_version(path: Path):
    marker = json.loads((path / "COMPLETE").read_text())
    (path / "COMPLETE").write_text(json.dumps({**marker, "version": 99}))


def _truncated(path: Path):
    file = path / "tensors.safetensors"
    file.write_bytes(file.read_bytes()[:200])


@pytest.mark.parametrize(
    "damage,needle",
    [(_no_marker, "COMPLETE: missing"), (_garbage_marker, "COMPLETE: unreadable"),
     (_future_version, "version 99"), (_truncated, "tensors.safetensors: truncated")],
)  # fmt: skip
def test_damaged_newest_checkpoint_is_an_error_with_a_deliberate_fallback(straight, tmp_path, capsys, damage, needle):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    newest = out / "checkpoints" / "step-00000004"
    damage(newest)
    before = tree(out)
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--steps", "4", "--no-progress")
    assert rc == 2
    one_error_line(err, "step-00000004", needle, "--skip-damaged-checkpoint", "step-00000003")
    assert tree(out) == before
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--skip-damaged-checkpoint", "--no-progress")
    assert rc == 0, err
    assert (out / "checkpoints" / "step-00000004.damaged").is_dir()  # kept for the user, out of the way
    assert_equal_nested(outputs(straight), outputs(out))  # redone from step 3: the same run


# ---------------------------------------------------------------- 5. one-line errors, the run directory consistent
def test_disk_full_during_a_save_is_one_line_and_resumable(straight, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real = ck._write_json

    def full_disk(path, obj):
        calls.append(path.name)
        if calls.count(ck.STATE_FILE) == 3:  # the third checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, obj)

    monkeypatch.setattr(ck, "_write_json", full_disk)
    rc, _, err = run(capsys, "train", *RUN, "--steps", "4", "--out", out)
    assert rc == 2
    one_error_line(err, "No space left on device", "step-00000003", "step-00000002 is intact", "--resume")
    assert entries(out / "checkpoints") == ["step-00000001", "step-00000002"]  # no temp directory left
    assert not (out / lock.LOCK_FILE).exists()  # released
    monkeypatch.setattr(ck, "_write_json", real)
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--no-progress")
    assert rc == 0, err
    assert_equal_nested(outputs(straight), outputs(out))


def test_file_size_limit_during_a_save_is_one_line_and_resumable(straight, tmp_path, capsys):
    """The real thing, not a mock: RLIMIT_FSIZE set while the third checkpoint is written, so safetensors' writer
    fails with EFBIG (as with a full disk: its own error type, not an OSError) in a forked child."""
    import resource

    out, stderr = tmp_path / "run", tmp_path / "stderr.txt"
    saves = []

    def limit(point: str) -> None:
        saves.append(point == "save:tmp-created")
        if sum(saves) == 3 and point == "save:tmp-created":
            resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def job():
        ck.fault_hook = limit
        with open(stderr, "w") as err, contextlib.redirect_stderr(err):
            rc = main(["train", *RUN, "--steps", "4", "--out", str(out)])
        os._exit(rc)

    assert reap(fork(job)) == 2
    one_error_line(stderr.read_text(), "File too large", "step-00000003", "step-00000002 is intact")
    assert entries(out / "checkpoints") == ["step-00000001", "step-00000002"]
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--no-progress")
    assert rc == 0, err
    assert_equal_nested(outputs(straight), outputs(out))


def test_internal_error_shows_a_traceback_and_leaves_a_resumable_run(straight, tmp_path, capsys, monkeypatch):
    from flowkern.train import Trainer

    out = tmp_path / "run"
    real = Trainer.train_step

    def failing(self):
        if self.step == 3:
            raise RuntimeError("an internal bug")
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", failing)
    with pytest.raises(RuntimeError, match="an internal bug"):  # not swallowed into one line
        main(["train", *RUN, "--steps", "4", "--out", str(out)])
    assert entries(out / "checkpoints") == ["step-00000002", "step-00000003"]
    assert not (out / lock.LOCK_FILE).exists()
    monkeypatch.setattr(Trainer, "train_step", real)
    capsys.readouterr()
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--no-progress")
    assert rc == 0, err
    assert_equal_nested(outputs(straight), outputs(out))


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    from flowkern.train import Trainer

    def no_memory(self):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(Trainer, "train_step", no_memory)
    rc, _, err = run(capsys, "train", *RUN, "--steps", "1", "--out", tmp_path / "run")
    assert rc == 2
    one_error_line(err, "out of memory", "--batch-size")


@pytest.mark.parametrize(
    "config,needles",
    [
        ({"prompt": 7}, ["--prompt must be a list of strings", "7"]),
        ({"steps": "10"}, ["--steps must be an int", "'10'"]),
        ({"steps": 2.0}, ["--steps must be an int"]),
        ({"beta": "big"}, ["--beta must be a number or null"]),
        ({"reward": 5}, ["--reward must be a list of strings"]),
        ({"reward_source": {"hps": 3}}, ["--reward-source must be an object"]),
        ({"resume": "yes"}, ["--resume must be true or false"]),
        ({"lora_alpha": [1]}, ["--lora-alpha must be a number or null"]),
        ({"seed": 2**64}, ["--seed must be an int in [0, 9223372036854775807]"]),
        ({"seed": -1}, ["--seed must be an int in [0,"]),
        ({"steps": 2**40}, ["--steps must be an int in [1, 2147483647]"]),
        ({"num_steps": 10**9}, ["--num-steps must be an int in [1, 10000]"]),
        ({"allow_change": ["beta"]}, ["--allow-change beta", "lr, value_lr, grad_clip, device"]),
        ({"prompts": 3}, ["prompts must be a file name"]),
    ],
)
def test_bad_config_values_of_any_type_are_one_line(config, needles, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "toy", "reward": "bump", **config}))
    rc, _, err = run(capsys, "train", "--config", path, "--out", tmp_path / "run")
    assert rc == 2
    one_error_line(err, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "demo", "eval"])
def test_out_of_range_seed_flag_is_one_line(command, tmp_path, capsys):
    extra = ["--lora", tmp_path] if command == "eval" else []
    rc, _, err = run(capsys, command, "--seed", 2**64, "--out", tmp_path / "x", *extra)
    assert rc == 2
    one_error_line(err, "--seed", "must be <= 9223372036854775807")
    assert not (tmp_path / "x").exists()


def test_reward_weights_from_a_config_object_are_kept(tmp_path, capsys):
    from flowkern.app.build import load_model, reward_for_run
    from flowkern.app.run import TrainOptions

    assert TrainOptions(reward={"bump": -1, "linear": 0.5}).reward == ["bump:-1", "linear:0.5"]
    setup = load_model("toy", num_steps=2)
    x = torch.tensor([[4.0, 0.0], [1.0, 1.0]])
    plus, _ = reward_for_run(["bump"], setup)
    minus, _ = reward_for_run(TrainOptions(reward={"bump": -1}).reward, setup)
    assert torch.equal(minus(x), -plus(x)) and plus(x).abs().sum() > 0


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--method", "vggflow", "--K", "2"], ["--K has no effect with method vggflow", "dam, refl, draft"]),
        (["--method", "refl", "--beta", "5"], ["--beta has no effect with method refl"]),
        (["--method", "dam", "--eta", "linear"], ["--eta has no effect with method dam"]),
        (["--resolution", "64"], ["--resolution has no effect with model toy"]),
        (["--precision", "bf16"], ["--precision has no effect with model toy"]),
        (["--lora-rank", "4"], ["--lora-rank has no effect with model toy"]),
        (["--prompt", "a cat"], ["--prompt has no effect with model toy"]),
    ],
)
def test_flags_without_effect_are_refused(extra, needles, tmp_path, capsys):
    rc, _, err = run(capsys, "train", *TOY, "--steps", "1", "--out", tmp_path / "run", *extra)
    assert rc == 2
    one_error_line(err, *needles)
    assert not (tmp_path / "run").exists()


def _corrupt_model(tmp_path: Path, how: str) -> tuple[Path, str]:
    from flowkern.app.build import ASSET_DIR

    model = tmp_path / "model"
    shutil.copytree(ASSET_DIR, model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    if how == "no weights":
        weights.unlink()
        return model, "diffusion_pytorch_model.safetensors is missing"
    if how == "no config":
        (model / "transformer" / "config.json").unlink()
        return model, "config.json is missing"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
        return model, "is truncated or corrupt"
    if how == "flipped header":
        data = bytearray(weights.read_bytes())
        data[20] ^= 0xFF
        weights.write_bytes(bytes(data))
        return model, "is truncated or corrupt"
    (model / "flowkern_tiny.json").write_text("{not json")
    return model, "flowkern_tiny.json"


@pytest.mark.parametrize("how", ["no weights", "no config", "truncated", "flipped header", "bad info"])
def test_corrupt_or_incomplete_model_directory_is_one_line(how, tmp_path, capsys):
    model, needle = _corrupt_model(tmp_path, how)
    rc, _, err = run(capsys, "train", "--model", model, "--steps", "1", "--out", tmp_path / "run", "--no-progress")
    assert rc == 2
    one_error_line(err, needle)
    assert not (tmp_path / "run").exists()
    rc, _, err = run(capsys, "demo", "--fast", "--no-progress", "--model", model, "--out", tmp_path / "demo")
    assert rc == 2
    one_error_line(err, needle)


def test_a_local_looking_path_is_not_tried_on_the_hub(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    start = time.perf_counter()
    rc, _, err = run(capsys, "train", "--model", "models/sd3-typo", "--out", tmp_path / "r1")
    assert rc == 2
    one_error_line(err, "models/sd3-typo does not exist", "models/ is a local directory")
    rc, _, err = run(capsys, "train", "--model", "someone/model", "--out", tmp_path / "r2")  # tests run offline
    assert rc == 2
    one_error_line(err, "someone/model is not a local directory", "offline")
    assert time.perf_counter() - start < 10  # no hub retries (they took 33 s)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_a_checkpoint_of_the_previous_format_still_resumes(straight, tmp_path, capsys):
    """State version 1 (flowkern before strict resume: no recorded settings or options) resumes: the config is
    compared, the options come from run_config.json."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    for step in ("step-00000003", "step-00000004"):
        path = out / "checkpoints" / step
        state = ck.read_state(path)
        del state["settings"], state["run_info"]
        state["version"], state["config"]["extra"] = 1, {}
        shutil.rmtree(path)
        ck.write_state(state, out / "checkpoints", int(step[5:]))
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--steps", "4", "--no-progress")
    assert rc == 0, err
    (out / "checkpoints" / "step-00000004").rename(out / "checkpoints" / "step-00000004.old-format")
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--steps", "4", "--no-progress")
    assert rc == 0, err
    assert_equal_nested(outputs(straight), outputs(out))
