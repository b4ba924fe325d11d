"""scripts/gpu_check.py's bookkeeping (budget shares, JUnit and sanitizer parsing, the summary, the sources hash),
benchmarks/gpu_status.py (the README's GPU block) and the benchmark subsets. The whole dry run is CI's
`scripts/gpu_check.sh OUTDIR --dry-run` (scripts/test.sh)."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_check  # noqa: E402

from benchmarks import common, gpu_status  # noqa: E402


def test_stage_shares_split_what_is_left_by_weight():
    shares = gpu_check.stage_shares(100.0, ["a", "b"], {"a": 1, "b": 3, "c": 100})
    assert shares == {"a": 25.0, "b": 75.0}
    full = gpu_check.stage_shares(540.0, list(gpu_check.STAGES), gpu_check.STAGES)
    assert sum(full.values()) == pytest.approx(540.0)
    assert len(gpu_check.OUTPUTS) <= gpu_check.MAX_OUTPUTS


def test_junit_counts_skips_and_failures(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="t" name="ok"/>'
        '<testcase classname="t" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="t" name="sk"><skipped message="needs a CUDA device"/></testcase>'
        '<testcase classname="t" name="sk2"><skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = gpu_check.junit_counts(str(xml))
    assert (counts["tests"], counts["failures"], counts["errors"], counts["skipped"]) == (4, 1, 0, 2)
    assert counts["failed_names"] == ["t::bad"] and counts["skipped_reasons"] == {"needs a CUDA device": 2}
    assert gpu_check.junit_counts(str(tmp_path / "missing.xml"))["missing"] is True


def test_sanitizer_error_summary():
    assert gpu_check.sanitizer_errors("========= ERROR SUMMARY: 0 errors\n") == 0
    assert gpu_check.sanitizer_errors("a\n========= ERROR SUMMARY: 3 errors\nb") == 3
    assert gpu_check.sanitizer_errors("no summary: the program died first") is None


def test_sources_hash_follows_the_extension_sources(tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "flowkern" / "ops" / "op").mkdir(parents=True)
    (tmp_path / "setup.py").write_text("setup()")
    (tmp_path / "csrc" / "a.cpp").write_text("int a;")
    kernel = tmp_path / "flowkern" / "ops" / "op" / "cuda.cu"
    kernel.write_text("__global__ void k() {}")
    first = gpu_check.sources_hash(str(tmp_path))
    (tmp_path / "flowkern" / "ops" / "op" / "reference.py").write_text("x = 1")  # Python: not the extension's
    assert gpu_check.sources_hash(str(tmp_path)) == first
    kernel.write_text("__global__ void k() { }")
    assert gpu_check.sources_hash(str(tmp_path)) != first


def _bench_row(provider, host_ms, **kw):
    return {"op": "vggflow_matching_loss", "mode": "fwd_bwd", "dtype": "bf16", "shape_name": "sd3_1024_B8",
            "provider": provider, "host_ms": host_ms, **kw}  # fmt: skip


def _gpu_result(dry_run=False):
    rows = [_bench_row("torch", 8.0), _bench_row("torch_compile", 1.5),
            _bench_row("flowkern_cuda", 1.0, kernel_ms=0.9, fraction_of_copy_bandwidth=0.93, kernels_per_call=2),
            _bench_row("flowkern_triton", 1.2)]  # fmt: skip
    update = {"name": "sd3-medium/vggflow/1024px/B1", "seconds_per_update": 3.5, "max_memory_allocated": 20e9}
    return {
        "dry_run": dry_run, "budget_s": 540, "elapsed_s": 530.0,
        "stages": {"env": {"ok": True, "info": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130"}},
                   "tests": {"ok": True, "tests": 382, "failures": 0, "errors": 0, "skipped": 0},
                   "memcheck": {"ok": True, "passed": 10, "checks": 10, "sanitizer_errors": 0},
                   "bench": {"ok": True, "cases": 4, "targets": gpu_check.loss_targets(rows)},
                   "updates": {"ok": True, "rows": [update], "adjoint": []}},
    }  # fmt: skip


def test_loss_targets_and_summary():
    result = _gpu_result()
    (target,) = result["stages"]["bench"]["targets"]
    assert target["best"] == "flowkern_cuda"
    assert target["vs_compile"] == pytest.approx(1.5) and target["vs_eager"] == pytest.approx(8.0)
    text = gpu_check.summary_markdown(result)
    assert "| tests | yes | - | 382 tests, 0 failed, 0 errors, 0 skipped" in text
    row = "| vggflow_matching_loss | fwd_bwd | bf16 | sd3_1024_B8 | flowkern_cuda | 1.000 | 0.900 | 93% | 1.50x"
    assert row in text
    assert "| sd3-medium/vggflow/1024px/B1 | 3.50 | 20.00 |" in text


def test_readme_gpu_status_block_matches_the_committed_results():
    with open(os.path.join(ROOT, "README.md")) as f:
        assert gpu_status.readme_block(f.read()) == gpu_status.block(), "run python benchmarks/gpu_status.py --write"


def test_gpu_status_from_results(tmp_path):
    assert gpu_status.block(str(tmp_path)) == gpu_status.NONE_YET
    folder = tmp_path / "benchmarks" / "results" / "h100"
    folder.mkdir(parents=True)
    (folder / "gpu_check.json").write_text(json.dumps(_gpu_result(dry_run=True)))
    assert gpu_status.block(str(tmp_path)) == gpu_status.NONE_YET  # a dry run is no GPU run
    (folder / "gpu_check.json").write_text(json.dumps(_gpu_result()))
    text = gpu_status.block(str(tmp_path))
    assert text.startswith("GPU run on NVIDIA H100 80GB HBM3 (`benchmarks/results/h100/gpu_check.json`")
    assert "tests ok: 382 tests, 0 failed, 0 skipped" in text
    assert "worst 93% of copy bandwidth kernel-only (target 90%), worst 1.50x torch.compile" in text
    assert "3.50 s/update, 20.0 GB max_memory_allocated (target under 24 GB)" in text
    with pytest.raises(ValueError, match="markers"):
        gpu_status.readme_block("# no markers")


def _config(**options):
    defaults = {"benchmark_disable": False, "bench_tiny": False, "full_matrix": False, "bench_subset": "default",
                "bench_providers": None}  # fmt: skip
    defaults.update(options)
    return SimpleNamespace(getoption=lambda name, default=None: defaults.get(name, default))


def _item(op, provider, mode, dtype, shape_name, batch, am_mode=""):
    params = {"provider": provider, "mode": mode, "dtype": dtype, "case": (shape_name, (batch, 16, 128, 128))}
    if am_mode:
        params["am_mode"] = am_mode
    return SimpleNamespace(callspec=SimpleNamespace(params=params), originalname=f"bench_{op}", name=f"bench_{op}")


def test_benchmark_subsets_keep_and_order():
    default, gpu = _config(), _config(bench_subset="gpu-check")
    compile_fwd = _item("cfg_euler", "torch_compile", "fwd", "fp32", "sd3_512_B4", 4)
    compile_train = _item("cfg_euler", "torch_compile", "fwd_bwd", "fp32", "sd3_512_B4", 4)
    assert not common.keep(compile_fwd, default) and common.keep(compile_train, default)
    assert common.keep(_item("reward_grad_clip", "torch_compile", "fwd", "fp32", "sd3_512_B4", 4), default)
    assert not common.keep(_item("cfg_euler", "flowkern_cpp", "fwd", "fp32", "sd3_1024_B8", 8), gpu)
    assert not common.keep(_item("cfg_euler", "torch_compile", "fwd_bwd", "fp32", "sd3_1024_B1", 1), gpu)
    assert common.keep(_item("cfg_euler", "torch_compile", "fwd_bwd", "fp32", "sd3_1024_B8", 8), gpu)
    narrowed = _config(bench_providers="torch")
    assert not common.keep(compile_train, narrowed)
    loss_b8 = _item("vggflow_matching_loss", "flowkern_cuda", "fwd_bwd", "bf16", "sd3_1024_B8", 8)
    other_b8 = _item("cfg_euler", "torch", "fwd_bwd", "bf16", "sd3_1024_B8", 8)
    loss_b1 = _item("vggflow_matching_loss", "torch", "fwd_bwd", "bf16", "sd3_1024_B1", 1)
    assert sorted([loss_b1, other_b8, loss_b8], key=common.priority) == [loss_b8, other_b8, loss_b1]


def test_prebuilt_so_is_used_only_for_this_python_and_these_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "PREBUILT", str(tmp_path))
    assert gpu_check._prebuilt() is None
    so = tmp_path / f"_C.cpython-{sys.version_info.major}{sys.version_info.minor}-x86_64-linux-gnu.so"
    so.write_bytes(b"")
    (tmp_path / "sources.sha256").write_text("0" * 64 + "\n")  # built from other sources
    assert gpu_check._prebuilt() is None
    (tmp_path / "sources.sha256").write_text(gpu_check.sources_hash() + "\n")
    assert gpu_check._prebuilt() == str(so)
    so.rename(tmp_path / "_C.cpython-39-x86_64-linux-gnu.so")  # another Python's ABI
    assert gpu_check._prebuilt() is None
