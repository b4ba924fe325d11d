"""Soak test: SIGKILL ``flowkern train`` at random moments, resume it, and check the finished run is bit-exact.

    python scripts/soak_resume.py --minutes 3 [--seed 0] [--methods vggflow,am,dam] [--work DIR]

For each method, one uninterrupted reference run of the 2-D toy (``--steps`` updates, a checkpoint after every update,
the newest two kept). Then rounds until the time is up: the same run is started and killed with SIGKILL after a
random delay, resumed with ``flowkern train --out RUN --resume`` and killed again, up to ``--kills`` times, then
resumed to the end (a run killed before its first checkpoint starts over with ``--overwrite``). Every so often the
finished run is resumed once more with ``--steps`` at its last checkpoint (nothing to train) and killed too. The
finished run's LoRA (toy residual), value net and log (without wall-clock times) must equal the reference bit for
bit. One line per round, then a summary; exit status 1 on any mismatch or unexpected failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY = ["--model", "toy", "--reward", "bump", "--num-steps", "4", "--batch-size", "4", "--eval-samples", "4",
       "--no-progress", "--checkpoint-every", "1", "--keep-checkpoints", "2"]  # fmt: skip


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""))
    return e


def command(method: str, steps: int, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flowkern", "train", *TOY, "--method", method, "--steps", str(steps),
            "--out", str(out), *extra]  # fmt: skip


def digest(out: Path) -> str:
    """SHA-256 over the LoRA, the value net (if any) and the log without wall-clock times."""
    h = hashlib.sha256()
    for name in ("lora/toy_residual.safetensors", "value_net.safetensors"):
        if (out / name).is_file():
            h.update((out / name).read_bytes())
    for line in (out / "log.jsonl").read_text().splitlines():
        record = {k: v for k, v in json.loads(line).items() if k != "time_s"}
        h.update(json.dumps(record, sort_keys=True).encode())
    return h.hexdigest()


def newest_step(out: Path) -> int:
    """The newest checkpoint's step (-1 if none), as a directory listing shows it."""
    steps = [int(p.name[5:]) for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    return max(steps, default=-1)


def run_killed(cmd: list[str], *, after: float | None = None, out: Path | None = None, at_step: int | None = None,
               jitter: float = 0.0) -> int | None:  # fmt: skip
    """Run ``cmd``; SIGKILL it ``after`` seconds, or ``jitter`` seconds once ``out`` has a checkpoint of step
    ``at_step``, unless it ended first. Returns its exit status, None if it was killed."""
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + (after if after is not None else 3600.0)
    while proc.poll() is None and time.monotonic() < deadline:
        if at_step is not None and newest_step(out) >= at_step:
            time.sleep(jitter)
            break
        time.sleep(0.005)
    if proc.poll() is None and (after is not None or at_step is not None):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None
    proc.wait()
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.read()[-2000:])
    return proc.returncode


def one_round(method: str, steps: int, out: Path, reference: str, span: float, rng: random.Random, kills: int):
    """(kills done, resumes run, ok) of one interrupted-and-resumed run. Most kills land a random moment after a
    random checkpoint (inside later updates and saves), the others at a random time (start-up, evaluation)."""
    killed = resumes = 0
    while True:
        resume = newest_step(out) >= 0 if out.exists() else False
        if resume:
            cmd = [sys.executable, "-m", "flowkern", "train", "--out", str(out), "--resume"]  # the short form
        else:
            cmd = command(method, steps, out, *(("--overwrite",) if out.exists() else ()))
        resumes += resume
        first = max(1, newest_step(out) + 1)  # the next checkpoint to be written
        if killed >= kills:
            status = run_killed(cmd)
        elif first <= steps and rng.random() < 0.75:
            status = run_killed(cmd, out=out, at_step=rng.randint(first, steps), jitter=rng.uniform(0.0, 0.3))
        else:
            status = run_killed(cmd, after=rng.uniform(0.2 * span, 1.1 * span))
        if status is None:
            killed += 1
            continue
        if status != 0:
            return killed, resumes, False
        break
    if rng.random() < 0.3:  # a resume with nothing to train, killed too: the finished run must survive it
        again = [sys.executable, "-m", "flowkern", "train", "--out", str(out), "--resume", "--steps", str(steps)]
        status = run_killed(again, after=rng.uniform(0.2 * span, 1.1 * span))
        killed += status is None
        if status not in (None, 0):
            return killed, resumes, False
        if status is None:
            resumes += 1
            if run_killed([sys.executable, "-m", "flowkern", "train", "--out", str(out), "--resume"]) != 0:
                return killed, resumes, False
    return killed, resumes, digest(out) == reference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="vggflow,am,dam")
    parser.add_argument("--steps", type=int, default=30, help="updates per run")
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs per round before it may finish")
    parser.add_argument("--work", default=None, help="scratch directory [a new temporary one, removed after]")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="flowkern-soak-"))
    rng = random.Random(args.seed)
    methods = args.methods.split(",")
    references, spans = {}, {}
    for method in methods:
        out = work / f"reference-{method}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        if run_killed(command(method, args.steps, out)) != 0:
            print(f"reference run of {method} failed")
            return 1
        spans[method] = time.perf_counter() - start
        references[method] = digest(out)
        print(f"reference {method}: {spans[method]:.1f} s, {args.steps} updates, digest {references[method][:12]}")
    deadline = time.monotonic() + 60 * args.minutes
    rounds = failures = total_kills = total_resumes = 0
    while time.monotonic() < deadline:
        method = methods[rounds % len(methods)]
        out = work / f"round-{rounds:04d}"
        kills, resumes, ok = one_round(method, args.steps, out, references[method], spans[method], rng, args.kills)
        rounds += 1
        total_kills += kills
        total_resumes += resumes
        failures += not ok
        print(f"round {rounds:3d} {method:8s} kills {kills} resumes {resumes}: {'bit-exact' if ok else 'MISMATCH'}",
              flush=True)  # fmt: skip
        if ok:
            shutil.rmtree(out, ignore_errors=True)
    print(f"{rounds} rounds, {total_kills} SIGKILLs, {total_resumes} resumes, {failures} mismatches or failures")
    if args.work is None and not failures:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
