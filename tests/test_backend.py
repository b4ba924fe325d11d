"""Backend selection (design.md section 2): priority, overrides, clear errors, fallback without the extension."""

import importlib
import subprocess
import sys

import pytest
import torch

import flowkern
from flowkern.ops import backend

vgg = importlib.import_module("flowkern.ops.vggflow_matching_loss")
X = torch.zeros(2, 3)


def selected(impls=None, device="cpu") -> str:
    return backend.select_backend("op", impls or vgg.IMPLS, torch.device(device))


def test_automatic_cpu_choice():
    expected = "cpp" if backend.HAS_EXT else ("triton" if backend.triton_interpreting() else "torch")
    assert selected() == expected


def test_use_backend_overrides_env(monkeypatch):
    monkeypatch.setenv("FLOWKERN_BACKEND", "torch")
    assert selected() == "torch"
    with flowkern.use_backend("triton"):
        assert selected() == "triton"
        with flowkern.use_backend(None):
            assert selected() == "torch"  # None = back to env/automatic
    assert selected() == "torch"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"):
        with flowkern.use_backend("tpu"):
            pass
    monkeypatch.setenv("FLOWKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match="FLOWKERN_BACKEND"):
        selected()


def test_backend_for_matches_select_backend(monkeypatch):
    """The public functions' shortcut (no torch.device in the common case) chooses what select_backend chooses."""

    class Sub(torch.Tensor):
        pass

    def check(x=X, device="cpu"):
        assert backend.backend_for("op", vgg.IMPLS, "v_ft", x) == selected(device=device)

    check()
    check(X.as_subclass(Sub))  # not a plain tensor: through select_backend
    with flowkern.use_backend("torch"):
        check()
    monkeypatch.setenv("FLOWKERN_BACKEND", "torch")
    check()
    monkeypatch.setenv("FLOWKERN_BACKEND", "auto")
    check()
    check(torch.zeros(2, 3, device="meta"), device="meta")
    with pytest.raises(TypeError, match="v_ft must be a torch.Tensor, got list"):
        backend.backend_for("op", vgg.IMPLS, "v_ft", [1.0])


def test_forced_backend_that_cannot_serve_raises():
    with flowkern.use_backend("cuda"), pytest.raises(backend.BackendUnavailableError, match="cuda"):
        selected()
    with flowkern.use_backend("cpp"), pytest.raises(backend.BackendUnavailableError, match="cpp"):
        selected(device="meta")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with flowkern.use_backend("triton"), pytest.raises(backend.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        selected()


def test_compile_chooses_once_while_tracing():
    """torch.compile evaluates the backend choice while tracing (no graph break, no recompile per call)."""
    v = torch.randn(2, 3, requires_grad=True)
    zeros = torch.zeros(2, 3)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(v):
        return flowkern.vggflow_matching_loss(v, zeros, zeros, zeros, 0.5, 1.0)

    with flowkern.use_backend("torch"):
        a = f(v)
    b = f(v)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, flowkern.vggflow_matching_loss(v, zeros, zeros, zeros, 0.5, 1.0))


@pytest.mark.skipif(not backend.HAS_EXT, reason="flowkern._C is not built")
def test_native_ops_are_registered_in_cpp():
    """Schemas, CPU kernels and autograd come from flowkern._C: an eager call never enters Python op machinery."""
    for name in ("vggflow_matching_loss", "adjoint_matching_loss", "consistency_residual", "cfg_euler"):
        op = f"flowkern::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd")
    assert vgg.IMPLS["cpp"] is torch.ops.flowkern.vggflow_matching_loss.default


def test_works_and_warns_once_without_extension(tmp_path):
    """Hide flowkern._C: the package imports, warns once, and falls back to Triton/PyTorch."""
    code = """
import sys, warnings, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "flowkern._C":
            raise ImportError("hidden by test")
sys.meta_path.insert(0, Block())
import torch, flowkern
from flowkern.ops import backend
assert not backend.HAS_EXT
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    x = torch.randn(2, 3)
    for _ in range(3):
        loss = flowkern.vggflow_matching_loss(x, x, torch.zeros_like(x), torch.zeros_like(x), 0.5, 1.0)
msgs = [str(m.message) for m in w if "flowkern._C" in str(m.message)]
assert len(msgs) == 1, msgs
assert float(loss) == 0.0
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=None)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
