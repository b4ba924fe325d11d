"""GPU proof in one lease (issue 19): test and measure every GPU path in one command with a time budget.

    scripts/gpu_check.sh OUTDIR [--dry-run] [--budget SECONDS] [--stages env build tests ...]

Stages, in order; each runs in its own process with a share of the time left (proportional to its weight in
STAGES, so an early finish gives later stages more and an overrun squeezes them), a soft deadline it watches itself
(FLOWKERN_DEADLINE: pytest skips what it has not started, the smoke and updates scripts stop between cases) and a
hard timeout a little later. After every stage the JSON and the summary are rewritten, so a run stopped from
outside (SIGTERM, SIGINT) still leaves what it had.

1. env: Python, torch, CUDA, Triton, diffusers, the GPU (nvidia-smi), nvcc, compute-sanitizer.
2. build: flowkern._C with the CUDA kernels: the prebuilt .so carried in .gpu_prebuilt/ when its sources hash
   (:func:`sources_hash`) matches the tree's, else `setup.py build_ext --inplace` (sm_90a, MAX_JOBS=16, offline);
   then asserts that the CUDA kernels loaded and every op has its cuda and triton backends.
3. tests: `pytest tests/ops -m gpu` (cuda and triton backends); skipped tests count as failures.
4. smoke: scripts/gpu_check_smoke.py (every op and mode, fp32/bf16, odd/aligned/misaligned, fp64 reference, side
   stream, CUDA-graph replay), then under compute-sanitizer memcheck and racecheck with
   PYTORCH_NO_CUDA_MEMORY_CACHING=1 (stages smoke, memcheck, racecheck).
5. bench: `pytest benchmarks --bench-subset gpu-check` (SD3 and FLUX.2-Klein 1024 px latents, B in {1, 8}, fp32 and
   bf16, eager / torch.compile / triton / cuda; copy bandwidth first; kernel-only and host-inclusive times).
6. updates: scripts/gpu_check_updates.py (VGG-Flow at 1024 px, one update per method at 512 px, the adjoint row).

OUTDIR gets at most 8 files (OUTPUTS): gpu_check.json (everything, stage by stage), summary.md (also printed last),
gpu_check.log (every stage's output), pytest.xml, smoke.json, sanitizer.log, bench.json, updates.json.

--dry-run (CPU, CI): the same plumbing with tiny shapes on the torch and Triton-interpreter backends: no build (the
CPU extension must load), a few op tests, the smoke on one case per op, the sanitizer stages without
compute-sanitizer (the same smoke under the same environment), the benchmarks at tiny shapes, the updates on the
tiny SD3 config.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCRIPTS = os.path.join(ROOT, "scripts")
PREBUILT = os.path.join(ROOT, ".gpu_prebuilt")
OUTPUTS = ("gpu_check.json", "summary.md", "gpu_check.log", "pytest.xml", "smoke.json", "sanitizer.log",
           "bench.json", "updates.json")  # fmt: skip
MAX_OUTPUTS = 8  # the device tool brings back at most 8 files from $OUT
SANITIZER_LOG_LIMIT = 4 << 20  # bytes of each sanitizer run's output kept in sanitizer.log
GRACE_S = 25  # past a stage's soft deadline before it is killed (a case in flight finishes)
RESERVE_S = 10  # kept at the end to write the outputs

# (stage, weight): a stage gets weight / (sum of the weights of the stages left) of the time left. The weights are
# the expected seconds on an H100 with the prebuilt extension (see docs/gpu_check.md for how they were estimated).
STAGES = {
    "env": 10,
    "build": 15,
    "tests": 90,
    "smoke": 45,
    "memcheck": 75,
    "racecheck": 60,
    "bench": 110,
    "updates": 110,
}
BUILD_FROM_SOURCE_WEIGHT = 120  # the build's weight when no matching prebuilt .so was carried (24 units, MAX_JOBS=16)

# the smoke cases of a dry run: one per op (the whole set runs in CI's tests/ops already)
DRY_SMOKE_CASES = ("vggflow_matching_loss/quad", "adjoint_matching_loss/memoryless", "cfg_euler/ode",
                   "adjoint_step/ode", "consistency_probes", "consistency_residual", "consistency_residual_exact",
                   "reward_grad_clip")  # fmt: skip
DRY_TESTS = ["tests/ops/test_vggflow_matching_loss.py", "-m", "not gpu", "-k", "triton and matches_reference"]


def sources_hash(root: str = ROOT) -> str:
    """sha256 over the extension's sources and build recipe (csrc/, setup.py, flowkern/ops/*/*.{cpp,cu,cuh,h}):
    the prebuilt .so is used only when this matches what it was built from."""
    paths = glob.glob("csrc/**/*", root_dir=root, recursive=True) + ["setup.py"]
    for ext in ("cpp", "cu", "cuh", "h"):
        paths += glob.glob(f"flowkern/ops/*/*.{ext}", root_dir=root)
    digest = hashlib.sha256()
    for rel in sorted(p for p in set(paths) if os.path.isfile(os.path.join(root, p))):
        with open(os.path.join(root, rel), "rb") as f:
            digest.update(rel.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def stage_shares(left_s: float, stages: list[str], weights: dict[str, float]) -> dict[str, float]:
    """Each remaining stage's share of `left_s` seconds, proportional to its weight."""
    total = sum(weights[s] for s in stages) or 1.0
    return {s: left_s * weights[s] / total for s in stages}


def junit_counts(path: str) -> dict:
    """tests, failures, errors, skipped (and the first skipped/failed names) of a JUnit XML file."""
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed_names": [], "skipped_reasons": {}}
    if not os.path.exists(path):
        return {**out, "missing": True}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        out["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is None:
                continue
            out[{"failure": "failures", "error": "errors", "skipped": "skipped"}[tag]] += 1
            if tag == "skipped":
                reason = (el.get("message") or "").strip()[:200]
                out["skipped_reasons"][reason] = out["skipped_reasons"].get(reason, 0) + 1
            elif len(out["failed_names"]) < 30:
                out["failed_names"].append(name)
    return out


def sanitizer_errors(text: str) -> int | None:
    """The count in compute-sanitizer's closing 'ERROR SUMMARY: N errors' line (None: no summary printed)."""
    found = None
    for line in text.splitlines():
        if "ERROR SUMMARY:" in line:
            try:
                found = int(line.split("ERROR SUMMARY:")[1].split()[0])
            except (IndexError, ValueError):
                continue
    return found


@dataclass
class Run:
    """One gpu_check run: where it writes, its clock, and what each stage found."""

    out: str
    dry_run: bool
    budget_s: float
    t0: float
    work: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="gpu_check_"))
    stages: dict = field(default_factory=dict)
    child: subprocess.Popen | None = None

    @property
    def end(self) -> float:
        return self.t0 + self.budget_s

    def left(self) -> float:
        return self.end - RESERVE_S - time.time()

    def log(self, text: str) -> None:
        with open(os.path.join(self.out, "gpu_check.log"), "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log(text)

    def env(self, deadline: float | None = None, **extra) -> dict:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([ROOT, SCRIPTS] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # tests run with deterministic algorithms
        if self.dry_run:
            env["TRITON_INTERPRET"] = "1"
            env.setdefault("CUDA_VISIBLE_DEVICES", "")
        if deadline is not None:
            env["FLOWKERN_DEADLINE"] = f"{deadline:.1f}"
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def sh(self, cmd: list[str], timeout: float, env: dict | None = None, log_to: str | None = None) -> dict:
        """Run `cmd` in its own process group; its output goes to gpu_check.log (or `log_to`) and is returned.
        Killed (the whole group) after `timeout` seconds."""
        start = time.time()
        self.log(f"$ {' '.join(cmd)}  (timeout {timeout:.0f} s)")
        with tempfile.TemporaryFile("w+") as buf:
            self.child = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env(), stdout=buf, stderr=subprocess.STDOUT,
                                          start_new_session=True, text=True)  # fmt: skip
            timed_out = False
            try:
                rc = self.child.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill(self.child)
                rc = self.child.wait()
            self.child = None
            buf.seek(0)
            text = buf.read()
        if log_to:
            with open(log_to, "a") as f:
                f.write(f"$ {' '.join(cmd)}\n{text[-SANITIZER_LOG_LIMIT:]}\n")
            self.log(text[-20000:])
        else:
            self.log(text)
        return {"rc": rc, "timed_out": timed_out, "seconds": round(time.time() - start, 1), "output": text}

    def save(self) -> None:
        """gpu_check.json and summary.md from what the stages found so far."""
        result = {"dry_run": self.dry_run, "budget_s": self.budget_s, "elapsed_s": round(time.time() - self.t0, 1),
                  "stages": self.stages, "outputs": sorted(os.listdir(self.out))}  # fmt: skip
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(summary_markdown(result, self.out))


def _kill(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _last_json_line(text: str, prefix: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith(prefix):
            try:
                return json.loads(line[len(prefix) :])
            except json.JSONDecodeError:
                return None
    return None


# ---------------------------------------------------------------- stages
ENV_SNIPPET = r"""
import json, os, platform, sys, torch
out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
       "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
for name in ("triton", "diffusers", "transformers", "peft", "numpy"):
    try:
        out[name] = __import__(name).__version__
    except Exception as err:
        out[name] = f"missing: {type(err).__name__}: {err}"[:200]
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
               gpu_memory_bytes=p.total_memory, l2_bytes=getattr(p, "L2_cache_size", None))
print("env:" + json.dumps(out))
"""


def stage_env(run: Run, timeout: float) -> dict:
    r = run.sh(_py("-c", ENV_SNIPPET), timeout)
    info = _last_json_line(r["output"], "env:") or {}
    tools = {}
    for name, cmd in {
        "nvidia_smi": ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,"
                       "temperature.gpu,power.draw", "--format=csv,noheader"],
        "nvcc": ["nvcc", "--version"],
        "compute_sanitizer": ["compute-sanitizer", "--version"],
    }.items():  # fmt: skip
        if shutil.which(cmd[0]) is None:
            tools[name] = None
            continue
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        tools[name] = (proc.stdout.strip().splitlines() or [""])[-1][:300]
    info.update(tools)
    run.log(json.dumps(info, indent=1))
    ok = r["rc"] == 0 and (run.dry_run or info.get("cuda_available") is True)
    if not run.dry_run and str(info.get("diffusers", "")).startswith("missing"):
        ok = False  # the updates need it: carry .whl (scripts/gpu_check_prepare.sh wheels)
    return {"ok": ok, "info": info}


CHECK_EXT = r"""
import json, torch
from flowkern.ops.backend import EXT_IMPORT_ERROR, HAS_CUDA_EXT, HAS_EXT, available_backends
import flowkern.ops as ops, importlib
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
missing = {}
for op in ("vggflow_matching_loss", "adjoint_matching_loss", "cfg_euler", "adjoint_step", "consistency_probes",
           "consistency_residual", "reward_grad_clip"):
    mod = importlib.import_module(f"flowkern.ops.{op}")
    for table in [n for n in dir(mod) if n.endswith("IMPLS")]:
        have = available_backends(getattr(mod, table), dev)
        want = ("cuda", "triton") if dev.type == "cuda" else ("cpp", "triton")
        lack = [b for b in want if b not in have]
        if lack:
            missing[f"{op}.{table}"] = lack
import flowkern
print("ext:" + json.dumps({"has_ext": HAS_EXT, "has_cuda_ext": HAS_CUDA_EXT, "error": str(EXT_IMPORT_ERROR or ""),
                           "missing_backends": missing, "so": [f for f in __import__("os").listdir(
                           __import__("os").path.dirname(flowkern.__file__)) if f.startswith("_C")]}))
"""


def _check_ext(run: Run, timeout: float) -> dict:
    r = run.sh(_py("-c", CHECK_EXT), timeout)
    return _last_json_line(r["output"], "ext:") or {"error": f"check failed (rc {r['rc']})"}


def stage_build(run: Run, timeout: float) -> dict:
    start = time.time()
    if run.dry_run:  # the CPU extension this machine built; the CUDA build needs the GPU machine
        ext = _check_ext(run, timeout)
        ok = bool(ext.get("has_ext")) and not ext.get("missing_backends")
        return {"ok": ok, "how": "dry run: CPU extension only", "ext": ext}
    how, ext = None, {}
    prebuilt = _prebuilt()
    if prebuilt is not None:
        shutil.copy2(prebuilt, os.path.join(ROOT, "flowkern", os.path.basename(prebuilt)))
        ext = _check_ext(run, 60)
        how = "prebuilt"
        if not ext.get("has_cuda_ext"):
            run.say(f"build: the prebuilt .so did not load its CUDA kernels ({ext.get('error')}); building")
            how = None
    elif os.path.isdir(PREBUILT):
        run.say("build: no prebuilt .so for this Python built from these sources; building")
    if how is None:
        env = run.env(None, MAX_JOBS=16, NVCC_THREADS=4, TORCH_CUDA_ARCH_LIST="9.0a", FLOWKERN_BUILD_EXT=1,
                      PIP_NO_INDEX=1)  # fmt: skip
        left = timeout - (time.time() - start) - 30
        r = run.sh(_py("setup.py", "-q", "build_ext", "--inplace"), left, env)
        how = f"built here in {r['seconds']} s (rc {r['rc']}{', timed out' if r['timed_out'] else ''})"
        ext = _check_ext(run, 60)
    ok = bool(ext.get("has_cuda_ext")) and not ext.get("missing_backends")
    return {"ok": ok, "how": how, "ext": ext}


def stage_tests(run: Run, timeout: float, deadline: float) -> dict:
    xml = os.path.join(run.out, "pytest.xml")
    args = DRY_TESTS if run.dry_run else ["tests/ops", "-m", "gpu"]
    cmd = _py("-m", "pytest", *args, "-q", "-rfEs", "-p", "no:cacheprovider", "-p", "gpu_check_pytest",
              f"--junitxml={xml}")  # fmt: skip
    if not run.dry_run and _importable("xdist"):
        cmd += ["-n", "4"]  # Triton compiles on the CPU: four workers share the GPU
    r = run.sh(cmd, timeout, run.env(deadline))
    counts = junit_counts(xml)
    ok = r["rc"] == 0 and counts["tests"] > 0 and counts["failures"] + counts["errors"] + counts["skipped"] == 0
    return {"ok": ok, "rc": r["rc"], "timed_out": r["timed_out"], **counts}


def _importable(name: str) -> bool:
    return subprocess.run(_py("-c", f"import {name}"), capture_output=True).returncode == 0


def _smoke(run: Run, name: str, timeout: float, deadline: float, tool: str | None) -> dict:
    part = os.path.join(run.work, f"smoke_{name}.json")
    cmd = _py(os.path.join(SCRIPTS, "gpu_check_smoke.py"), "--json", part)
    extra = {}
    if run.dry_run:  # the plumbing, not the coverage (CI's tests/ops cover the CPU backends)
        cmd += ["--cases", *DRY_SMOKE_CASES, "--layouts", "odd", "misaligned", "--dtypes", "bf16"]
    if tool is not None:
        extra["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # every buffer its own allocation: overruns are caught
        cmd += ["--checks", "reference", "stream"]  # graph capture needs the caching allocator's private pools
        if tool == "racecheck":  # shared-memory races: fp32 only (the same kernels' bf16 twins share the code)
            cmd += ["--dtypes", "fp32"]
    sanitizer = shutil.which("compute-sanitizer") if tool is not None else None
    if sanitizer is not None:
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", "86", "--print-limit", "200",
               "--target-processes", "all", *(["--leak-check", "no"] if tool == "memcheck" else []), *cmd]  # fmt: skip
    log_to = os.path.join(run.out, "sanitizer.log") if tool is not None else None
    r = run.sh(cmd, timeout, run.env(deadline, **extra), log_to)
    found = {}
    if os.path.exists(part):
        with open(part) as f:
            found = json.load(f)
    summary = found.get("summary", _last_json_line(r["output"], "smoke: ") or {})
    out = {"rc": r["rc"], "timed_out": r["timed_out"], "seconds": r["seconds"], **summary}
    if tool is not None:
        out["sanitizer"] = sanitizer or "not available (CPU dry run: the same smoke, no sanitizer)"
        out["sanitizer_errors"] = sanitizer_errors(r["output"]) if sanitizer else None
    ran = summary.get("checks", 0) - summary.get("skipped", 0)
    out["ok"] = r["rc"] == 0 and ran > 0 and summary.get("skipped", 0) == 0 and not out.get("sanitizer_errors")
    if tool is None and found:  # keep the per-check results of the plain run (the sanitizer runs: their counts)
        out["failures"] = [x for x in found.get("results", []) if x.get("error")][:50]
    _merge_smoke(run, name, found)
    return out


def _merge_smoke(run: Run, name: str, found: dict) -> None:
    path = os.path.join(run.out, "smoke.json")
    merged = {}
    if os.path.exists(path):
        with open(path) as f:
            merged = json.load(f)
    merged[name] = found
    with open(path, "w") as f:
        json.dump(merged, f, indent=1)


def stage_bench(run: Run, timeout: float, deadline: float) -> dict:
    path = os.path.join(run.out, "bench.json")
    cmd = _py("-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "-p", "gpu_check_pytest",
              "--bench-subset", "gpu-check", f"--benchmark-json={path}", "--benchmark-min-rounds=3",
              "--benchmark-max-time=0.2")  # fmt: skip
    if run.dry_run:
        cmd += ["--bench-tiny", "--bench-providers", "torch,flowkern_triton", "-k", "fwd_bwd and bf16"]
    r = run.sh(cmd, timeout, run.env(deadline))
    rows = bench_rows(path)
    out = {"rc": r["rc"], "timed_out": r["timed_out"], "cases": len(rows)}
    out["targets"] = loss_targets(rows)
    out["ok"] = r["rc"] == 0 and len(rows) > 0
    return out


def bench_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    if not text.strip():
        return []
    return [b.get("extra_info", {}) for b in json.loads(text).get("benchmarks", []) if "provider" in b.get(
        "extra_info", {})]  # fmt: skip


def loss_targets(rows: list[dict]) -> list[dict]:
    """Issue 19's loss-op targets at the largest batch measured (B = 8 on the GPU): per op, mode, dtype and shape,
    the best flowkern backend's fraction of copy bandwidth (kernel-only) and its host-inclusive speed-up over
    torch.compile and eager."""
    from benchmarks.common import LOSS_OPS

    groups: dict[tuple, dict] = {}
    for r in rows:
        if r.get("op") not in LOSS_OPS:
            continue
        key = (r["op"], r.get("am_mode", ""), r.get("mode"), r.get("dtype"), r.get("shape_name"))
        groups.setdefault(key, {})[r["provider"]] = r
    out = []
    for (op, am_mode, mode, dtype, shape), by in sorted(groups.items()):
        fk = [r for p, r in by.items() if p.startswith("flowkern_") and r.get("host_ms")]
        if not fk:
            continue
        best = min(fk, key=lambda r: r["host_ms"])
        row = {"op": op + (f"/{am_mode}" if am_mode else ""), "mode": mode, "dtype": dtype, "shape": shape,
               "best": best["provider"], "host_ms": best["host_ms"], "kernel_ms": best.get("kernel_ms"),
               "fraction_of_copy_bandwidth": best.get("fraction_of_copy_bandwidth"),
               "kernels_per_call": best.get("kernels_per_call")}  # fmt: skip
        for provider, key in (("torch_compile", "vs_compile"), ("torch", "vs_eager")):
            other = by.get(provider, {}).get("host_ms")
            row[key] = other / best["host_ms"] if other else None
        out.append(row)
    return out


def stage_updates(run: Run, timeout: float, deadline: float) -> dict:
    path = os.path.join(run.out, "updates.json")
    cmd = _py(os.path.join(SCRIPTS, "gpu_check_updates.py"), "--json", path)
    if run.dry_run:
        cmd += ["--tiny", "--methods", "dam"]  # the cheapest on a CPU; the same plumbing as every row
    predictions = os.path.join(PREBUILT, "planner.json")
    if os.path.exists(predictions):
        cmd += ["--predictions", predictions]
    r = run.sh(cmd, timeout, run.env(deadline))
    found = {}
    if os.path.exists(path):
        with open(path) as f:
            found = json.load(f)
    updates, adjoint = found.get("updates", []), found.get("adjoint", [])
    out = {"rc": r["rc"], "timed_out": r["timed_out"], "planner": found.get("planner", False),
           "rows": [{k: v for k, v in u.items() if k != "metrics"} for u in updates], "adjoint": adjoint}  # fmt: skip
    out["ok"] = r["rc"] == 0 and bool(updates) and not any("error" in u for u in updates)
    return out


# ---------------------------------------------------------------- the summary
def _gb(x) -> str:
    return f"{x / 1e9:.2f}" if isinstance(x, int | float) else "-"


def _f(x, spec=".2f", suffix="") -> str:
    return f"{x:{spec}}{suffix}" if isinstance(x, int | float) else "-"


def summary_markdown(result: dict, out_dir: str | None = None) -> str:
    """The run in a page: a table of stages, then the targets (loss ops at B = 8, VGG-Flow at 1024 px)."""
    kind = "dry run (CPU)" if result["dry_run"] else "GPU"
    stages = result["stages"]
    env = stages.get("env", {}).get("info", {})
    lines = [f"# gpu_check: {kind}, {result['elapsed_s']} s of a {result['budget_s']:.0f} s budget", ""]
    if env:
        lines.append(f"{env.get('gpu', 'no GPU')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
                     f"Triton {env.get('triton')}, Python {env.get('python')}, diffusers {env.get('diffusers')}; "
                     f"compute-sanitizer: {env.get('compute_sanitizer') or 'none'}")  # fmt: skip
        lines.append("")
    lines += ["| stage | ok | seconds | what |", "|---|---|---:|---|"]
    for name in STAGES:
        s = stages.get(name)
        if s is None:
            continue
        lines.append(f"| {name} | {'yes' if s.get('ok') else '**NO**'} | {s.get('stage_s', '-')} | {_what(name, s)} |")
    bench = stages.get("bench", {}).get("targets", [])
    if bench:
        lines += ["", "Loss ops (best flowkern backend; targets at B = 8: >= 90% of copy bandwidth kernel-only, "
                  ">= 1.2x torch.compile and >= 4x eager host-inclusive):", "",
                  "| op | mode | dtype | shape | best | host ms | kernel ms | of copy bw | vs compile | vs eager | "
                  "kernels |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for t in bench:
            lines.append(f"| {t['op']} | {t['mode']} | {t['dtype']} | {t['shape']} | {t['best']} | "
                         f"{_f(t['host_ms'], '.3f')} | {_f(t['kernel_ms'], '.3f')} | "
                         f"{_f(t['fraction_of_copy_bandwidth'], '.0%')} | {_f(t['vs_compile'], '.2f', 'x')} | "
                         f"{_f(t['vs_eager'], '.2f', 'x')} | {t.get('kernels_per_call', '-')} |")  # fmt: skip
    rows = stages.get("updates", {}).get("rows", [])
    if rows:
        lines += ["", "| update | s/update | max_memory_allocated GB | planner GB | error |"]
        lines.append("|---|---:|---:|---:|---|")
        for u in rows:
            lines.append(f"| {u.get('name')} | {_f(u.get('seconds_per_update'), '.2f')} | "
                         f"{_gb(u.get('max_memory_allocated', u.get('peak_above_start_bytes')))} | "
                         f"{_gb(u.get('planner_peak_bytes'))} | {u.get('error', '')} |")  # fmt: skip
    adjoint = stages.get("updates", {}).get("adjoint", [])
    if adjoint:
        lines += ["", "| adjoint row | K | strategy | seconds | peak GB |", "|---|---:|---|---:|---:|"]
        for a in adjoint:
            lines.append(f"| {a.get('model')} | {a.get('K')} | {a.get('strategy')} | {_f(a.get('seconds'), '.3f')} | "
                         f"{_gb(a.get('peak_bytes'))} | ")  # fmt: skip
    if out_dir is not None:
        lines += ["", f"Files: {', '.join(sorted(set(os.listdir(out_dir)) | {'summary.md'}))}"]
    return "\n".join(lines) + "\n"


def _what(name: str, s: dict) -> str:
    if "error" in s:
        return str(s["error"])[:200]
    if name == "build":
        ext = s.get("ext", {})
        return f"{s.get('how')}; CUDA kernels loaded: {ext.get('has_cuda_ext')}; missing backends: " + (
            json.dumps(ext.get("missing_backends")) if ext.get("missing_backends") else "none"
        )
    if name == "tests":
        return (f"{s.get('tests')} tests, {s.get('failures')} failed, {s.get('errors')} errors, {s.get('skipped')} "
                f"skipped (skips count as failures){'; timed out' if s.get('timed_out') else ''}")  # fmt: skip
    if name in ("smoke", "memcheck", "racecheck"):
        text = f"{s.get('passed', 0)}/{s.get('checks', 0)} checks passed, {s.get('failed', 0)} failed, " \
               f"{s.get('skipped', 0)} not run"  # fmt: skip
        if name != "smoke":
            errors = s.get("sanitizer_errors")
            text += f"; sanitizer errors: {errors if errors is not None else s.get('sanitizer')}"
        return text
    if name == "bench":
        return f"{s.get('cases')} cases measured{'; timed out' if s.get('timed_out') else ''}"
    if name == "updates":
        rows = s.get("rows", [])
        return f"{sum('error' not in r for r in rows)}/{len(rows)} updates, {len(s.get('adjoint', []))} adjoint rows"
    if name == "env":
        return "cuda available" if s.get("info", {}).get("cuda_available") else "no CUDA device"
    return ""


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, torch and Triton-interpreter")
    parser.add_argument("--budget", type=float, default=None, help="seconds in all (default: 540 GPU, 600 dry run)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--sources-hash", action="store_true", help="print the extension sources' hash and exit")
    args = parser.parse_args(argv)
    if args.sources_hash:
        print(sources_hash())
        return 0
    t0 = float(os.environ.get("FLOWKERN_GPU_CHECK_T0", time.time()))  # gpu_check.sh's start (wheels included)
    # the dry run takes 1-2 minutes on 2 idle cores; its generous budget keeps a slow CI machine from cutting stages
    budget = args.budget or (600.0 if args.dry_run else 540.0)
    os.makedirs(args.outdir, exist_ok=True)
    for name in os.listdir(args.outdir):  # outputs of an earlier run in the same folder
        if name in OUTPUTS:
            os.remove(os.path.join(args.outdir, name))
    run = Run(os.path.abspath(args.outdir), args.dry_run, budget, t0)

    def stop(signum, _frame):
        if run.child is not None:
            _kill(run.child)
        run.stages["stopped"] = {"ok": False, "error": f"stopped by signal {signum}"}
        run.save()
        print(summary_markdown(json.load(open(os.path.join(run.out, "gpu_check.json"))), run.out), flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    weights = dict(STAGES)
    if not args.dry_run and "build" in args.stages and _prebuilt() is None:
        weights["build"] = BUILD_FROM_SOURCE_WEIGHT
    pending = list(args.stages)
    while pending:
        name = pending[0]
        share = stage_shares(run.left(), pending, weights)[name]
        start = time.time()
        deadline = start + share
        timeout = max(5.0, min(share + GRACE_S, run.end - RESERVE_S / 2 - start))
        run.say(f"== {name}: {share:.0f} s (hard limit {timeout:.0f} s), {run.left():.0f} s left")
        if run.left() < 5:
            run.stages[name] = {"ok": False, "error": "not run: out of time"}
        else:
            try:
                if name == "env":
                    found = stage_env(run, timeout)
                elif name == "build":
                    found = stage_build(run, timeout)
                elif name == "tests":
                    found = stage_tests(run, timeout, deadline)
                elif name == "smoke":
                    found = _smoke(run, "plain", timeout, deadline, None)
                elif name in ("memcheck", "racecheck"):
                    found = _smoke(run, name, timeout, deadline, name)
                elif name == "bench":
                    found = stage_bench(run, timeout, deadline)
                else:
                    found = stage_updates(run, timeout, deadline)
            except Exception as err:  # noqa: BLE001 - a broken stage is a finding; the others still run
                found = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            found["stage_s"] = round(time.time() - start, 1)
            run.stages[name] = found
        run.say(f"== {name}: {'ok' if run.stages[name].get('ok') else 'NOT OK'} in {time.time() - start:.0f} s")
        run.save()
        pending.pop(0)
    run.save()
    files = os.listdir(run.out)
    assert len(files) <= MAX_OUTPUTS, f"{len(files)} files in {run.out}: the device tool brings back {MAX_OUTPUTS}"
    with open(os.path.join(run.out, "summary.md")) as f:
        print(f.read(), flush=True)
    shutil.rmtree(run.work, ignore_errors=True)
    return 0 if all(s.get("ok") for s in run.stages.values()) else 1


def _prebuilt() -> str | None:
    """The carried .so (scripts/gpu_check_prepare.sh prebuilt) if it is for this Python and these sources."""
    recorded = os.path.join(PREBUILT, "sources.sha256")
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    found = glob.glob(os.path.join(PREBUILT, f"_C.{tag}-*.so"))
    if not found or not os.path.exists(recorded):
        return None
    with open(recorded) as f:
        return found[0] if f.read().split()[0] == sources_hash() else None


if __name__ == "__main__":
    sys.exit(main())
