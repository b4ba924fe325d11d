"""Will it fit my GPU?: the peak memory of one training update, predicted without weights or a GPU (issue 16).

The planner runs the real update (``Trainer.train_step``: sampling, the reward gradient through the VAE decode and
the reward tower, the adjoint sweep or the consistency terms, the loss, the backward, AdamW) on ``FakeTensorMode``
tensors: shapes, dtypes and devices, no data. A dispatch mode stacked over the fake mode (:class:`StorageTracker`)
sees every op's outputs and counts *storages*, not Python objects: a storage is allocated when an op returns one
that none of its inputs hold, and freed when its C++ storage dies (a weakref finalizer on the preserved Python
storage object), so tensors that autograd saves with no Python reference are counted while they live. Efficient zero
tensors (``torch.func.jvp``'s zero tangents) and meta tensors allocate nothing and are not counted; a sum of two
gradients by the autograd engine is charged in place of the buffer it reuses (``_reused_gradient``: the real engine
accumulates in place, which it cannot do on fake tensors).

Data-dependent scalars (``float(loss)``, ``bool(isfinite(...))``, ``.item()``) have no value under fake tensors:
the tracker answers ``aten._local_scalar_dense`` itself with a plausible value (1 / True: finite, keep the update),
so the update runs its ordinary path; nothing it decides from those values changes what it allocates except the
skip path, which the answer avoids.

CPU mode (``device='cpu'``) predicts what the profiler's allocator events measure on this machine (the checks),
with the CPU kernels' hidden temporaries measured once per signature (:data:`CPU_WORKSPACE_OPS`, and ops mixing
floating dtypes, whose CPU TensorIterator casts an input to a copy first: a bf16 output plus an fp32 LoRA term);
GPU mode (``device='cuda'``) predicts ``torch.cuda.max_memory_allocated`` and models, explicitly:

- attention: ``F.scaled_dot_product_attention`` is routed to the flash kernel (bf16/fp16) or the memory-efficient
  kernel (fp32) whose meta kernels allocate what they do on a GPU: the output and the logsumexp saved for
  backward, no L x L matrix (the CPU flash kernel allocates the same; the CPU math path would not); where the
  caller enables only the math kernel (``sdpa_kernel(SDPBackend.MATH)``: VGG-Flow's exact consistency under
  ``torch.func.jvp``, the reward's Hessian-vector product) the math kernel, with its L x L scores, computed in
  fp32 for bf16/fp16 inputs as on CUDA;
- the caching allocator's rounding: every block is a multiple of 512 bytes (``max_memory_allocated`` counts
  blocks); reserved memory (segments: 2 MiB for blocks <= 1 MiB, 20 MiB below 10 MiB, else a multiple of 2 MiB)
  is reported separately as an upper estimate, fragmentation is not modelled;
- the cuBLAS / cuBLASLt workspace: :data:`CUBLAS_WORKSPACE_BYTES` once, allocated by the first GEMM;
- the CUDA context (kernels, cuDNN/cuBLAS handles): outside ``max_memory_allocated``, reported separately as
  :data:`CUDA_CONTEXT_BYTES` (a typical H100 / CUDA 12 figure with lazy module loading, not measured here).

Frozen weights are counted from the modules' parameters before the update (``resident``); a quantized frozen base
(``base_precision`` int8 / fp8, issue 17) through ``flowkern.models.quantize.quantized_weight_bytes`` (values and
per-row scales). The update runs through torchao's own quantized linears on fake tensors (``build_run`` quantizes the
base as ``flowkern train`` does), so their temporaries (the bf16 cast of an int8 weight, the fp32 copies of an fp8
one) and the bf16 weight autograd keeps for the input gradient are traced; torchao's weight-only path is the same
code on CPU and CUDA, so both modes model it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch._prims_common import is_non_overlapping_and_dense_or_false
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten

from flowkern import sampling
from flowkern.app.plan_models import PlausibleScalars
from flowkern.profiling import no_cyclic_gc

GIB = 2**30
MIB = 2**20
PHASES = ("rollout", "reward", "adjoint", "loss_backward", "probe", "optimizer", "other")
# what a storage alive at the peak is, from the innermost phase that allocated it (LoRA gradients: from their hooks)
KIND_OF_PHASE = {
    "rollout": "stored_trajectory",
    "reward": "reward_tower",
    "adjoint": "activations",
    "loss_backward": "activations",
    "probe": "activations",
    "optimizer": "lora_optimizer_state",
    "other": "activations",
}
KINDS = ("activations", "stored_trajectory", "reward_tower", "lora_optimizer_state")
CUBLAS_WORKSPACE_BYTES = 32 * MIB  # torch's default on Hopper (CUBLAS_WORKSPACE_CONFIG :4096:8), one stream
CUDA_CONTEXT_BYTES = 600 * MIB  # CUDA context + handles outside max_memory_allocated (typical, not measured)


# ---------------------------------------------------------------- the caching allocator (GPU mode)
def cuda_block_bytes(nbytes: int) -> int:
    """Bytes ``max_memory_allocated`` counts for one allocation: rounded up to a multiple of 512 (min 512)."""
    return 0 if nbytes == 0 else max(512, -(-nbytes // 512) * 512)


def cuda_segment_bytes(nbytes: int) -> int:
    """The segment a fresh allocation reserves (no reuse): 2 MiB for <= 1 MiB, 20 MiB below 10 MiB, else 2 MiB
    multiples (c10 CUDACachingAllocator's ``get_allocation_size``)."""
    if nbytes <= MIB:
        return 2 * MIB
    if nbytes < 10 * MIB:
        return 20 * MIB
    return -(-nbytes // (2 * MIB)) * 2 * MIB


# ---------------------------------------------------------------- CPU kernels' hidden temporaries (CPU mode)
# ops whose CPU kernels allocate workspaces no op returns: im2col columns (slow conv), oneDNN buffers, the CPU
# flash-attention kernels' per-thread blocks; each is measured once per signature on real zeros
CPU_WORKSPACE_OPS = (
    "convolution",
    "convolution_backward",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
)
_TRANSIENTS: dict[tuple, int] = {}


def _mixed_dtypes(args: tuple, kwargs: dict) -> bool:
    """Whether an op mixes floating dtypes in its (non-scalar) tensor inputs: a CPU TensorIterator casts the inputs
    not in the common dtype to copies first (a bf16 base's output plus an fp32 LoRA term: an fp32 copy of the bf16
    output), which no op returns; CUDA kernels cast in registers."""
    dtypes = {
        a.dtype
        for a in tree_flatten((args, kwargs))[0]
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.is_floating_point()
    }
    return len(dtypes) > 1


def _signature(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), tuple(a.stride()), a.dtype, a.requires_grad)
    return a if isinstance(a, int | float | bool | str | type(None)) else repr(a)


def measured_transient(func, args: tuple, kwargs: dict) -> int:
    """Bytes ``func``'s CPU kernel holds above its inputs and outputs (the peak inside the op minus its outputs'
    bytes), measured once per signature on real zeros of the arguments' shapes, strides and dtypes."""
    from torch.profiler import ProfilerActivity, profile

    flat, spec = tree_flatten((args, kwargs))
    key = (str(func), tuple(_signature(a) for a in flat))
    if key not in _TRANSIENTS:
        with _disable_current_modes():
            real = [
                torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).zero_().requires_grad_(a.requires_grad)
                if isinstance(a, torch.Tensor)
                else a
                for a in flat
            ]
            r_args, r_kwargs = tree_unflatten(real, spec)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = func(*r_args, **r_kwargs)
            storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tree_flatten(out)[0]
                        if isinstance(t, torch.Tensor)}  # fmt: skip
            del out
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
        running = peak = 0
        for _, nbytes in events:
            running += nbytes
            peak = max(peak, running)
        _TRANSIENTS[key] = max(0, peak - sum(storages.values()))
    return _TRANSIENTS[key]


# ---------------------------------------------------------------- storage tracking
# backward nodes of views whose backward only views the gradient (no allocation); see _as_strided_backward
PURE_VIEW_BACKWARDS = frozenset(
    {"ViewBackward0", "AliasBackward0", "TBackward0", "TransposeBackward0", "TransposeBackward1", "PermuteBackward0",
     "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3",
     "SqueezeBackward4", "ViewAsRealBackward0", "ViewAsComplexBackward0"}
)  # fmt: skip
_INPLACE_VIEW = "_flowkern_plan_inplace_view"  # set on a view an in-place op wrote to (its grad_fn is regenerated)


def _storage_extent(size: Any, stride: Any, offset: int) -> int:
    """Elements a storage needs for this geometry (c10's ``_min_storage_size``)."""
    return offset + 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else 0


def _as_strided_backward(view: torch.Tensor) -> Callable:
    """A pre-hook making the fake-replayed backward of ``view`` (written in place) allocate as the real one does.

    After an in-place op on a view, autograd regenerates the view's grad_fn. On real tensors (CPU and CUDA) that is
    ``AsStridedBackward0``, whose backward (``as_strided_backward``) allocates a zero buffer spanning the base and the
    view, copies the gradient into it and passes on a view of it; on fake tensors (a tensor subclass) autograd
    replays the view instead (``ViewBackward0``: a view of the incoming gradient, no allocation). The hook hands the
    replayed node the real node's buffer (e.g. torchao's int8 linear adds its bias in place to a reshaped output)."""
    base = view._base
    offset = view.storage_offset() - base.storage_offset()
    shared = min(offset, 0)  # as_strided_backward: offsets relative to the smaller of the two
    extent = max(
        _storage_extent(base.shape, base.stride(), -shared), _storage_extent(view.shape, view.stride(), offset - shared)
    )
    size, stride = tuple(view.shape), view.stride()

    def hook(grad_outputs: tuple) -> tuple:
        grad = grad_outputs[0]
        if grad is None:
            return grad_outputs
        storage = grad.new_zeros(extent)
        strided = storage.as_strided(size, stride, offset - shared)
        strided.copy_(grad)
        return (strided, *grad_outputs[1:])

    return hook


def _writes_a_view(func, args: tuple) -> bool:
    """Whether ``func`` writes in place to its first argument, a view, with autograd recording it."""
    schema = func._schema
    if not schema.arguments or not args or not isinstance(args[0], torch.Tensor) or not args[0]._is_view():
        return False
    alias = schema.arguments[0].alias_info
    if alias is None or not alias.is_write or not torch.is_grad_enabled():
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in tree_flatten(args)[0])


def _with_real_strides(func, args: tuple, out: Any) -> Any:
    """``out`` with the strides the real (C++) kernels give it in dimensions of size 1.

    Fake tensors compute strides in Python (``torch._refs``), which can differ from the C++ kernels' in dimensions
    of size 1, and memory-format decisions read them. A VAE attention output reshaped to [1, C, H, W] is
    (C, 1, W C, C)-strided on real tensors, (H W C, 1, W C, C) on fake ones; GroupNorm's ``suggest_memory_format``
    takes the latter for channels-last, and the fake VAE decode then ran channels-last from its mid block on, with
    other kernels' temporaries and without the real run's contiguous copy (FLUX.2-Klein's VAE at 256 px: 33 MB, 5.5%
    under the real peak). Two rules: ``aten.view`` gets the strides of the same view of a meta tensor (the C++
    kernel); a new tensor of the shape of inputs that share one dense layout gets that layout where they differ only
    in size-1 dimensions, as TensorIterator (and ``empty_like``) keep the inputs' strides."""
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.device.type == "meta":
        return out
    if func is torch.ops.aten.view.default:
        src = args[0]
        with _disable_current_modes():
            meta = torch.empty_strided(src.shape, src.stride(), dtype=src.dtype, device="meta").view(out.shape)
        if meta.stride() != out.stride():
            return torch.ops.aten.as_strided.default(src, out.shape, meta.stride(), out.storage_offset())
        return out
    tensors = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
    same = [a for a in tensors if a.shape == out.shape]
    if not same or len({a.stride() for a in same}) != 1 or not is_non_overlapping_and_dense_or_false(same[0]):
        return out
    if any(a.untyped_storage() is out.untyped_storage() for a in tensors):  # a view or an in-place op
        return out
    strides = same[0].stride()
    differ = [d for d, (a, b) in enumerate(zip(strides, out.stride(), strict=True)) if a != b]
    if differ and all(out.shape[d] == 1 for d in differ):
        out.as_strided_(out.shape, strides, out.storage_offset())
    return out


def _holds_no_memory(t: torch.Tensor) -> bool:
    """A tensor whose storage allocates nothing although its ``nbytes`` is its size: an efficient zero tensor
    (``aten._efficientzerotensor``: the zero tangents ``torch.func.jvp`` gives inputs without one) or a meta tensor
    (the shape computations of the zero tensors' decompositions, ``to(device='meta')`` then ``prims.add``)."""
    return t.device.type == "meta" or t._is_zerotensor()


class StorageTracker(PlausibleScalars):
    """Counts live storages created by ops (see the module docstring); peaks overall, by phase and by kind.

    ``round_bytes`` maps a storage's bytes to what the allocator charges (identity on CPU). ``scalar`` answers
    data-dependent scalar reads."""

    def __init__(
        self,
        round_bytes: Callable[[int], int] = lambda n: n,
        known: PlausibleScalars | None = None,
        cpu_workspaces: bool = False,
    ):
        super().__init__(known)
        self.cpu_workspaces = cpu_workspaces
        self.round_bytes = round_bytes
        self.phase_stack: list[str] = []
        self.live: dict[int, list] = {}  # key -> [bytes, kind]
        self._refs: dict[int, weakref.ref] = {}
        self._next = 0
        self.running = 0
        self.peak = 0
        self.by_kind = dict.fromkeys(KINDS, 0)
        self.peak_by_kind = dict.fromkeys(KINDS, 0)
        self.phase_peak = dict.fromkeys(PHASES, 0)
        self.peak_phase = "other"
        self.first_seen_bytes: list[int] = []  # every allocation's rounded size (reserved-memory estimate)
        self.to_host = False  # GPU mode, inside sampling.host_buffer: the storage is host memory, not the GPU's
        self.host_bytes = 0  # live offloaded-trajectory bytes (both modes) and their peak
        self.host_peak = 0

    # storages are keyed by the identity of their (preserved) Python object, alive as long as the C++ storage
    def _key(self, st: torch.UntypedStorage) -> int | None:
        key = getattr(st, "_flowkern_plan_key", None)
        return key if key is not None and key in self.live else None

    @property
    def phase(self) -> str:
        return self.phase_stack[-1] if self.phase_stack else "other"

    def _allocate(self, st: torch.UntypedStorage) -> None:
        nbytes = self.round_bytes(st.nbytes())
        key = self._next
        self._next += 1
        kind = "host" if self.to_host else KIND_OF_PHASE[self.phase]
        self.live[key] = [nbytes, kind]
        st._flowkern_plan_key = key
        self._refs[key] = weakref.ref(st, lambda _, k=key: self._free(k))
        self.first_seen_bytes.append(nbytes)
        self._add(nbytes, kind)

    def _add(self, nbytes: int, kind: str) -> None:
        if kind == "host":  # an offloaded trajectory on the GPU's host: not in max_memory_allocated
            return
        self.running += nbytes
        self.by_kind[kind] += nbytes
        phase = self.phase
        if self.running > self.phase_peak[phase]:
            self.phase_peak[phase] = self.running
        if self.running > self.peak:
            self.peak = self.running
            self.peak_phase = phase
            self.peak_by_kind = dict(self.by_kind)

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        self._refs.pop(key, None)
        if entry is not None and entry[1] != "host":
            self.running -= entry[0]
            self.by_kind[entry[1]] -= entry[0]
            # a phase's peak is sampled at every allocator event, frees too (as real_size.phase_profile measures):
            # a phase that only frees (the update's end after AdamW: its moments still held) peaks at that level
            phase = self.phase
            self.phase_peak[phase] = max(self.phase_peak[phase], self.running)

    def reclassify(self, t: torch.Tensor, kind: str) -> None:
        """Count ``t``'s storage as ``kind`` from now on (e.g. a LoRA gradient allocated by the backward)."""
        key = self._key(t.untyped_storage())
        if key is not None and self.live[key][1] != kind:
            nbytes, old = self.live[key]
            self.by_kind[old] -= nbytes
            self.by_kind[kind] += nbytes
            self.live[key][1] = kind

    def adopt(self, obj: Any) -> Any:
        """Count the real tensors in ``obj`` that no op returned (generator states: ``Generator.get_state`` and
        ``torch.get_rng_state`` bypass the dispatcher), while they live; returns ``obj``."""
        for t in tree_flatten(obj)[0]:
            if isinstance(t, torch.Tensor) and self._key(t.untyped_storage()) is None:
                self._allocate(t.untyped_storage())
        return obj

    def host_buffer(self, make: Callable[..., torch.Tensor], gpu: bool) -> Callable[..., torch.Tensor]:
        """``flowkern.sampling.host_buffer`` traced: its storage counted off the GPU in GPU mode (as CPU memory in
        CPU mode, where it is what the allocator measures) and as offloaded bytes in both modes."""

        def run(*args, **kwargs) -> torch.Tensor:
            self.to_host = gpu
            try:
                out = make(*args, **kwargs)
            finally:
                self.to_host = False
            st = out.untyped_storage()
            nbytes = st.nbytes()
            self.host_bytes += nbytes
            self.host_peak = max(self.host_peak, self.host_bytes)
            weakref.finalize(st, self._host_freed, nbytes)
            return out

        return run

    def _host_freed(self, nbytes: int) -> None:
        self.host_bytes -= nbytes

    def fetch(self, fetch: Callable[..., torch.Tensor], gpu: bool) -> Callable[..., torch.Tensor]:
        """``flowkern.sampling.fetch`` traced in GPU mode: a view of an offloaded trajectory comes back as a GPU copy
        (fake CPU tensors would not copy); an indexed piece is already a new storage, counted as that copy."""

        def run(x: torch.Tensor, device: Any) -> torch.Tensor:
            key = self._key(x.untyped_storage())
            if gpu and key is not None and self.live[key][1] == "host":
                return x.clone()
            return fetch(x, device)

        return run

    def add_workspace(self, nbytes: int, kind: str = "activations") -> None:
        """A fixed allocation that no op returns (the cuBLAS workspace), held until the end."""
        self.first_seen_bytes.append(nbytes)
        self._add(nbytes, kind)

    def _reused_gradient(self, func, args: tuple, kwargs: dict) -> int | None:
        """The autograd engine sums two gradients of one input (``InputBuffer::accumulate``) in place into one of
        them when it holds the only reference to it; under a Python dispatch mode, or on fake tensors (tensor
        subclasses), it cannot, and ``old + new`` allocates. The key of the buffer the real sum reuses, or None."""
        if func is not torch.ops.aten.add.Tensor or not _engine_accumulates(args, kwargs):
            return None
        for a in args:
            st = a.untyped_storage()
            key = self._key(st)
            # one tensor on the storage (2: that tensor and the count's own reference), of the sum's size
            if key is not None and torch._C._storage_Use_Count(st._cdata) <= 2 and st.nbytes() == a.nbytes:
                return key
        return None

    def _hook_regenerated_views(self, args: tuple) -> None:
        """A view written in place and now used again: autograd has regenerated its grad_fn (the using op's autograd
        kernel collected it before this dispatch); give it the real node's allocation (:func:`_as_strided_backward`)
        when its replayed backward is a mere view. Only an aten op's arguments are looked at: a view's grad_fn is
        never read here while autograd rebases or regenerates it (reading it then would keep the stale node)."""
        for a in args:
            if not isinstance(a, torch.Tensor) or not getattr(a, _INPLACE_VIEW, False):
                continue
            setattr(a, _INPLACE_VIEW, False)
            node = a.grad_fn
            if node is not None and node.name() in PURE_VIEW_BACKWARDS and _INPLACE_VIEW not in node.metadata:
                node.metadata[_INPLACE_VIEW] = True
                node.register_prehook(_as_strided_backward(a))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            return self.scalar(args[0])
        reused = self._reused_gradient(func, args, kwargs)
        if func.namespace != "prim":  # prim.device: also queried inside the in-place op's autograd, before its rebase
            self._hook_regenerated_views(args)
        before = self.running
        out = self.data_dependent(func, args, kwargs)
        if out is None:
            out = _with_real_strides(func, args, func(*args, **kwargs))
            self.note(func, args, kwargs, out)
        inputs = {
            id(a.untyped_storage())
            for a in tree_flatten((args, kwargs))[0]
            if isinstance(a, torch.Tensor) and not a.is_sparse
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_sparse or _holds_no_memory(t):
                continue
            st = t.untyped_storage()
            if id(st) in inputs:
                key = self._key(st)  # in-place resize (out= ops): charge the growth
                if key is not None and self.round_bytes(st.nbytes()) > self.live[key][0]:
                    grow = self.round_bytes(st.nbytes()) - self.live[key][0]
                    self.live[key][0] += grow
                    self._add(grow, self.live[key][1])
                continue
            if self._key(st) is None:
                if reused is not None:  # the sum lands in the buffer it reuses: that buffer's bytes, not more
                    self._free(reused)
                    reused = None
                self._allocate(st)
        if _writes_a_view(func, args):
            setattr(args[0], _INPLACE_VIEW, True)
        if self.cpu_workspaces and (func.__name__.split(".")[0] in CPU_WORKSPACE_OPS or _mixed_dtypes(args, kwargs)):
            extra = measured_transient(func, args, kwargs)
            if extra:  # held inside the op only: a peak candidate, not a live storage
                bump = max(before, self.running) + extra - self.running
                self._add(bump, "activations")
                self._add(-bump, "activations")
        return out


def _engine_accumulates(args: tuple, kwargs: dict) -> bool:
    """Whether this ``add`` is the autograd engine summing two gradients of one input: called from the engine's
    C++ (the innermost Python frame outside torch is ``_engine_run_backward``) with two gradients of one shape."""
    if kwargs or len(args) != 2 or torch._C._current_autograd_node() is None:
        return False
    a, b = args
    if not (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype):
        return False
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "_engine_run_backward":
        if not frame.f_code.co_filename.startswith(_TORCH_DIR) and frame.f_code.co_filename != __file__:
            return False  # Python code (a module's forward, a custom backward) called this add
        frame = frame.f_back
    return frame is not None


_TORCH_DIR = os.path.dirname(torch.__file__)


@contextlib.contextmanager
def _phase(tracker: StorageTracker, name: str) -> Iterator[None]:
    tracker.phase_stack.append(name)
    try:
        yield
    finally:
        tracker.phase_stack.pop()


@contextlib.contextmanager
def _patched(obj: Any, name: str, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """``obj.name`` (a module function or an instance's bound method) replaced by ``wrap(original)``."""
    original = getattr(obj, name)
    own = name in vars(obj)
    setattr(obj, name, wrap(original))
    try:
        yield
    finally:
        if own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


def phase_targets(trainer: Any) -> list[tuple[Any, str, str]]:
    """(object, attribute, phase) of the pieces of one update (the phases of benchmarks/real_size.py)."""
    import flowkern.methods._common as common

    targets = [
        (trainer.method, "rollout", "rollout"),
        (common, "evaluate_reward", "reward"),
        (common, "reward_and_grad", "reward"),
        (trainer.method, "loss", "loss_backward"),
        (trainer, "backward", "loss_backward"),
        (trainer, "residual_velocity_sq", "probe"),
        (trainer, "optimizer_step", "optimizer"),
    ]
    for module_name in ("flowkern.methods.adjoint_matching", "flowkern.methods.vggflow"):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "lean_adjoint"):
            targets.append((module, "lean_adjoint", "adjoint"))
    return [t for t in targets if hasattr(t[0], t[1])]


@contextlib.contextmanager
def _phases(tracker: StorageTracker, trainer: Any) -> Iterator[None]:
    def wrap(name):
        def wrapper(fn):
            def run(*args, **kwargs):
                with _phase(tracker, name):
                    return fn(*args, **kwargs)

            return run

        return wrapper

    def adopting(fn):
        return lambda *args, **kwargs: tracker.adopt(fn(*args, **kwargs))

    with contextlib.ExitStack() as stack:
        for obj, attr, name in phase_targets(trainer):
            stack.enter_context(_patched(obj, attr, wrap(name)))
        # RNG states saved at the update's start and by every checkpointed region (5 kB each on the CPU)
        stack.enter_context(_patched(trainer.streams, "snapshot", adopting))
        stack.enter_context(_patched(torch, "get_rng_state", adopting))
        yield


# ---------------------------------------------------------------- GPU attention (flash / memory-efficient / math)
def _gpu_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What ``F.scaled_dot_product_attention`` runs on an H100, honouring the backends the caller enabled
    (``torch.nn.attention.sdpa_kernel``): flash (bf16/fp16, no mask) or memory-efficient attention, which keep the
    output and the logsumexp for backward, no L x L matrix; the math kernel when only it is enabled (VGG-Flow's
    forward-mode AD: the fused kernels have no JVP rule), which materialises the L x L scores and, on CUDA, computes
    bf16/fp16 inputs in fp32 unless ``allow_fp16_bf16_reduction_math_sdp`` is set."""
    aten = torch.ops.aten
    backends = torch.backends.cuda
    half = query.dtype in (torch.float16, torch.bfloat16)
    if backends.flash_sdp_enabled() and attn_mask is None and half and not enable_gqa:
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
    if backends.mem_efficient_sdp_enabled() and not enable_gqa:
        return aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
        )[0]
    if not backends.math_sdp_enabled():
        raise RuntimeError("scaled_dot_product_attention: no backend enabled that the planner models")
    upcast = half and not backends.fp16_bf16_reduction_math_sdp_allowed()
    q, k, v = (t.float() for t in (query, key, value)) if upcast else (query, key, value)
    out = aten._scaled_dot_product_attention_math(
        q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )[0]
    return out.to(query.dtype) if upcast else out


@contextlib.contextmanager
def gpu_attention() -> Iterator[None]:
    with _patched(F, "scaled_dot_product_attention", lambda _: _gpu_sdpa):
        yield


# ---------------------------------------------------------------- the trace
def module_bytes(modules: dict[str, Any]) -> dict[str, int]:
    """Bytes of each module's parameters and buffers (shared tensors once), by name."""
    seen: set[int] = set()
    out = {}
    for name, module in modules.items():
        total = 0
        if module is not None:
            for t in list(module.parameters()) + list(module.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        out[name] = total
    return out


def trace_update(trainer: Any, device: str = "cpu", known: PlausibleScalars | None = None) -> dict:
    """Run ``trainer.train_step()`` (built under the caller's FakeTensorMode) with a :class:`StorageTracker`;
    the update's peak bytes above the level at its start, by phase and by kind."""
    gpu = torch.device(device).type == "cuda"
    tracker = StorageTracker(cuda_block_bytes if gpu else (lambda n: n), known, cpu_workspaces=not gpu)
    params = [p for group in trainer.param_groups.values() for p in group]
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: tracker.reclassify(p.grad, "lora_optimizer_state"))
        for p in params
    ]
    import flowkern.methods._common as common

    offload = contextlib.ExitStack()
    offload.enter_context(_patched(sampling, "host_buffer", lambda make: tracker.host_buffer(make, gpu)))
    for module in (sampling, common):  # the methods' C.fetch and the adjoint sweep's sampling.fetch
        offload.enter_context(_patched(module, "fetch", lambda fetch: tracker.fetch(fetch, gpu)))
    try:
        with no_cyclic_gc(), _phases(tracker, trainer), offload, gpu_attention() if gpu else contextlib.nullcontext():
            with tracker:
                if gpu:
                    tracker.add_workspace(CUBLAS_WORKSPACE_BYTES)
                trainer.train_step()
    finally:
        for h in hooks:
            h.remove()
    reserved = _reserved_estimate(tracker) if gpu else None
    return {
        "peak_bytes": tracker.peak,
        "peak_phase": tracker.peak_phase,
        "phases": {p: tracker.phase_peak[p] for p in PHASES},
        "kinds": dict(tracker.peak_by_kind),
        "reserved_bytes": reserved,
        "scalar_reads": tracker.scalar_reads,
        "offloaded_bytes": tracker.host_peak,  # the stored trajectory in (pinned) CPU memory (offload_trajectory)
        "skipped": [list(s) for s in getattr(trainer, "skipped", [])],
    }


def _reserved_estimate(tracker: StorageTracker) -> int:
    """An upper estimate of the allocator's reserved memory at the peak: the peak with large blocks in 2 MiB
    segments (small blocks share 2 MiB segments); fragmentation not modelled."""
    return -(-tracker.peak // (2 * MIB)) * 2 * MIB


def frozen_weight_bytes(transformer: Any, base_precision: str | None = None) -> int:
    """Bytes of the transformer's frozen (non-LoRA) parameters and its buffers; ``base_precision`` ('bf16', 'int8',
    'fp8') stores its base linears as ``flowkern train --base-precision`` does (issue 17), None as built."""
    from flowkern.models.quantize import quantized_weight_bytes, weight_bytes

    buffers = sum(b.numel() * b.element_size() for b in transformer.buffers())
    if base_precision is None:
        return weight_bytes(transformer) + buffers
    return quantized_weight_bytes(transformer, base_precision) + buffers


# ---------------------------------------------------------------- the planner's entry points
# transformer config keys that count identical blocks, by backbone kind (FLUX.1 / FLUX.2: double and single blocks)
BLOCK_COUNTS = {"sd3": ("num_layers",), "sit": ("num_layers",), "flux": ("num_layers", "num_single_layers"),
                "flux2": ("num_layers", "num_single_layers")}  # fmt: skip
FIT_DEPTHS = (2, 3)  # the two depths each block count is traced at


def plan(model: Any, device: str = "cuda", extrapolate: bool = True, **knobs: Any) -> dict:
    """Predict the peak memory of one training update of ``model`` (a shipped config name such as
    ``'sd3-medium'``, a local pipeline directory, or a :class:`~flowkern.app.plan_models.ModelSpec`) with
    ``knobs`` (the fields of :class:`~flowkern.app.plan_models.Knobs`: method, K, consistency, lora_rank,
    precision, batch, grad_accum, resolution, num_steps, micro_batch, checkpoint_backbone, checkpoint_vae,
    base_precision), without weights or a GPU.

    ``device='cuda'`` predicts ``torch.cuda.max_memory_allocated`` (see the module docstring for what is
    modelled), ``'cpu'`` the CPU allocator's peak on this machine. Returns a JSON-able dict: ``total_bytes``
    (resident + the update's peak), ``resident`` (bytes held before the update, by module), ``update`` (the
    update's peak above that, by phase and by kind), ``cuda_context_bytes`` and ``reserved_bytes`` (GPU), ``knobs``.

    ``extrapolate`` (a backbone deeper than 3 blocks of each type): trace the update with 2 and 3 blocks of each
    type and extrapolate every byte count (each phase's peak, the kinds at the peak, the resident weights) as an
    affine function of the block counts to the real depth (:func:`extrapolate_in_blocks`); ``False``: one trace of
    the full depth (minutes per plan of a real config on this CPU).
    """
    from flowkern.app.plan_models import Knobs, resolve

    spec = resolve(model)
    unknown = sorted(set(knobs) - {f for f in Knobs.__dataclass_fields__})
    if unknown:
        raise TypeError(f"plan() got unknown knob(s) {unknown}")
    Knobs(**knobs).check(spec)
    if torch.device(device).type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    keys = BLOCK_COUNTS.get(spec.kind, ())
    depths = {key: int(spec.transformer.get(key, 0)) for key in keys}
    if not extrapolate or not keys or min(depths.values()) <= max(FIT_DEPTHS):
        prediction = _plan_once(spec, device, Knobs(**knobs))
    else:
        prediction = extrapolate_in_blocks(spec, device, knobs, depths)
    del prediction["resident_bytes"]
    return prediction


def _with_depths(spec: Any, depths: dict[str, int]) -> Any:
    import dataclasses

    return dataclasses.replace(spec, transformer={**spec.transformer, **depths})


def extrapolate_in_blocks(spec: Any, device: str, knobs: dict, depths: dict[str, int]) -> dict:
    """The prediction at ``depths`` from traces at 2 and 3 blocks of each type (one type at a time, the others at
    2): every byte count c is fitted as c(n) = c(2) + sum_type (n_type - 2) (c(3 in that type) - c(2)), exact when
    each phase's peak lies at a point fixed by the structure (the same op of the same block, or outside the blocks)
    in all traces. The traces must agree on the peak phase; ``fit`` in the result records the depths traced."""
    from flowkern.app.plan_models import Knobs

    lo, hi = FIT_DEPTHS
    base_depths = dict.fromkeys(depths, lo)
    base = _plan_once(_with_depths(spec, base_depths), device, Knobs(**knobs))
    steps = {key: _plan_once(_with_depths(spec, {**base_depths, key: hi}), device, Knobs(**knobs)) for key in depths}

    def fit(get: Callable[[dict], int]) -> int:
        return get(base) + sum((depths[key] - lo) * (get(steps[key]) - get(base)) for key in depths)

    out = {**base, "model": spec.name}
    out["resident_bytes"] = {name: fit(lambda p, name=name: p["resident_bytes"][name]) for name in base["resident"]}
    gpu = base["device"] == "cuda"
    out["resident"] = {name: cuda_block_bytes(v) if gpu else v for name, v in out["resident_bytes"].items()}
    update = dict(base["update"])
    update["phases"] = {ph: fit(lambda p, ph=ph: p["update"]["phases"][ph]) for ph in PHASES}
    update["kinds"] = {kind: fit(lambda p, kind=kind: p["update"]["kinds"][kind]) for kind in KINDS}
    update["peak_bytes"] = fit(lambda p: p["update"]["peak_bytes"])
    update["offloaded_bytes"] = fit(lambda p: p["update"]["offloaded_bytes"])
    traced_phases = {p["update"]["peak_phase"] for p in (base, *steps.values())}
    top = max(update["phases"], key=update["phases"].get)
    if len(traced_phases) > 1 or top != base["update"]["peak_phase"] or update["phases"][top] != update["peak_bytes"]:
        raise RuntimeError(
            f"extrapolate: the peak moves between phases with depth ({sorted(traced_phases)} traced, {top} "
            "extrapolated): the affine fit is not exact; plan with extrapolate=False (--no-extrapolate)"
        )
    if update["reserved_bytes"] is not None:
        update["reserved_bytes"] = -(-update["peak_bytes"] // (2 * MIB)) * 2 * MIB
    out["update"] = update
    out["total_bytes"] = sum(out["resident"].values()) + update["peak_bytes"]
    if out["reserved_bytes"] is not None:
        out["reserved_bytes"] = sum(out["resident"].values()) + update["reserved_bytes"]
    out["seconds"] = round(base["seconds"] + sum(p["seconds"] for p in steps.values()), 1)
    out["fit"] = {"depths": depths, "traced": [lo, hi]}
    return out


def _plan_once(spec: Any, device: str, k: Any) -> dict:
    """One trace of ``spec`` at its own depth with knobs ``k`` (see :func:`plan`)."""
    import time

    from torch._subclasses.fake_tensor import FakeTensorMode

    from flowkern.app.plan_models import build_run, fake_building
    from flowkern.ops.backend import use_backend

    k.check(spec)
    start = time.perf_counter()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_building(fake) as known:  # fake CPU tensors in both modes (fake CUDA RNG cannot initialise)
        trainer, resident_modules = build_run(spec, k, device="cpu")
    with fake, use_backend("torch"):  # the reference ops (flowkern's fused kernels have no fake kernels)
        update = trace_update(trainer, device, known)
    resident = module_bytes(resident_modules)
    # LoRA parameters live in the transformer's modules: reported apart from its frozen weights
    resident["transformer"] = frozen_weight_bytes(resident_modules["transformer"], k.base_precision)
    resident["lora"] = sum(p.numel() * p.element_size() for p in trainer.model.trainable_parameters())
    gpu = torch.device(device).type == "cuda"
    resident_bytes = dict(resident)  # before the allocator's rounding (what extrapolation fits)
    if gpu:
        resident = {name: cuda_block_bytes(v) for name, v in resident.items()}
    total = sum(resident.values()) + update["peak_bytes"]
    return {
        "resident_bytes": resident_bytes,
        "model": spec.name,
        "kind": spec.kind,
        "device": "cuda" if gpu else "cpu",
        "knobs": {
            **k.__dict__,
            "resolution": k.resolution or spec.resolution,
            "num_steps": k.num_steps or spec.num_steps,
        },
        "total_bytes": total,
        "resident": resident,
        "update": update,
        "cuda_context_bytes": CUDA_CONTEXT_BYTES if gpu else 0,
        "reserved_bytes": (sum(resident.values()) + update["reserved_bytes"]) if gpu else None,
        "text_encoder_bytes": spec.text_encoder_params * (2 if k.precision == "bf16" else 4),
        "seconds": round(time.perf_counter() - start, 1),
    }


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}  # fmt: skip


def parse_budget(text: Any) -> int:
    """``'24GB'`` (10^9 bytes), ``'24GiB'`` / ``'24G'`` (2^30), ``'800MB'``, a plain number of bytes -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        raise ValueError(f"--memory-budget: expected a size such as 24GB, 24GiB or 16000MB, got {text!r}")
    value = int(float(match.group(1)) * UNITS[unit])
    if value < 2**30:
        raise ValueError(f"--memory-budget: {text!r} is below 1 GiB: no model here trains in that")
    return value


def fits(prediction: dict) -> int:
    """Bytes a card needs for ``prediction``: the allocator's peak plus the CUDA context."""
    return prediction["total_bytes"] + prediction["cuda_context_bytes"]


def quantized_bases(model: Any, device: str = "cuda") -> tuple[str, ...]:
    """The quantized frozen bases (issue 17) the budget search may try after bf16: int8, then fp8, where torchao is
    importable and the model kind loads quantized bases (``build.FOR_MODELS['base_precision']``); fp8 only where
    the device serves it: probed on a CPU or a visible GPU (``quantize.check_fp8``); a GPU that is not here (the
    planner's ``'cuda'`` on this machine) is assumed to store float8 weights, which weight-only fp8 needs (no fp8
    matmul: before sm_89 torchao dequantizes to bf16), and :func:`knob_line` says so."""
    import importlib.util

    from flowkern.app.build import FOR_MODELS
    from flowkern.app.plan_models import resolve

    if importlib.util.find_spec("torchao") is None or resolve(model).kind not in FOR_MODELS["base_precision"]:
        return ()
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return ("int8", "fp8")
    from flowkern.models.quantize import check_fp8

    try:
        check_fp8(device)
    except ValueError:
        return ("int8",)
    return ("int8", "fp8")


def candidate_knobs(knobs: dict, base_precisions: tuple[str, ...] = (), faster: bool = True) -> list[tuple[str, dict]]:
    """The knob settings the budget search tries, cheapest in time first: (what changed, knobs). Each step keeps
    the previous ones: no recomputation; the VAE decode's; the default (per-block backbone, per-layer VAE and
    reward tower); the stored trajectory offloaded to pinned CPU memory (host copies of a few latents per step);
    per-sublayer recomputation of the backbone (~one more forward of its attention and MLP); batch 1 with
    accumulation; K = 1. Then the same steps again with each of ``base_precisions`` (int8, fp8: a quantized frozen
    base, :func:`quantized_bases`) stored below the knobs' own (bf16 < int8 < fp8; an fp32 run is not quantized:
    that would change its compute dtype). ``faster=False`` starts each precision's steps at the default."""
    own = knobs.get("base_precision") or ("bf16" if knobs.get("precision", "bf16") == "bf16" else None)
    order = ("bf16", "int8", "fp8")
    lower = [q for q in order if own in order and order.index(q) > order.index(own) and q in base_precisions]
    out = _knob_steps(knobs, faster)
    for q in lower:
        out += [(f"{q} base: {what}", setting) for what, setting in _knob_steps({**knobs, "base_precision": q}, faster)]
    return out


def _knob_steps(knobs: dict, faster: bool) -> list[tuple[str, dict]]:
    base = {"checkpoint_backbone": True, "checkpoint_vae": True, "checkpoint_reward": True, **knobs}
    off = {"checkpoint_backbone": False, "checkpoint_vae": False, "checkpoint_reward": False}
    out = []
    if faster:
        out.append(("no gradient checkpointing (fastest)", {**base, **off}))
        out.append(("checkpoint the VAE decode only", {**base, **off, "checkpoint_vae": True}))
    out.append(("per-block checkpointing of the backbone, per-layer of the VAE and the reward tower (the default)",
                base))  # fmt: skip
    if not base.get("offload_trajectory"):
        base = {**base, "offload_trajectory": True}
        out.append(("offload the stored trajectory to pinned CPU memory", base))
    if base.get("recompute", "block") != "sublayer":
        base = {**base, "recompute": "sublayer"}
        out.append(("recompute the backbone per sublayer (attention, MLP)", base))
    batch = int(base.get("batch", 1))
    if batch > 1:
        accum = int(base.get("grad_accum", 1)) * batch
        out.append((f"batch 1 with {accum} accumulation steps", {**base, "batch": 1, "grad_accum": accum}))
        base = {**base, "batch": 1, "grad_accum": accum}
    if base.get("method", "dam") in ("dam", "draft", "refl") and (base.get("K") or 1) > 1:
        out.append(("K = 1 (changes the method's truncation)", {**base, "K": 1}))
    return out


FP8_ASSUMES = "weight-only: assumes the GPU's torch stores float8_e4m3fn; no fp8 matmul needed"


def knob_line(knobs: dict) -> str:
    """The memory knobs of a setting in one line (what ``--memory-budget`` prints), its frozen base's precision
    last (an fp8 base with what it assumes of the GPU)."""
    k = {"checkpoint_backbone": True, "checkpoint_vae": True, "checkpoint_reward": True, "recompute": "block",
         "offload_trajectory": False, "batch": 1, "grad_accum": 1, **knobs}  # fmt: skip
    on = lambda flag: "on" if flag else "off"
    base = k.get("base_precision") or k.get("precision", "bf16")
    return (
        f"recompute {k['recompute'] if k['checkpoint_backbone'] else 'none'}, VAE checkpointing "
        f"{on(k['checkpoint_vae'])}, reward-tower checkpointing {on(k['checkpoint_reward'])}, trajectory offload "
        f"{on(k['offload_trajectory'])}, batch {k['batch']} x {k['grad_accum']} accumulation, K {k.get('K')}, "
        f"base {base}" + (f" ({FP8_ASSUMES})" if base == "fp8" else "")
    )


def choose(
    model: Any,
    budget: Any,
    device: str = "cuda",
    candidates: list[tuple[str, dict]] | None = None,
    plan_fn: Callable[..., dict] | None = None,
    **knobs: Any,
) -> dict:
    """The first setting of :func:`candidate_knobs` (with the :func:`quantized_bases` step) whose prediction fits
    ``budget`` (bytes or a size string): ``{'choice': what changed, 'prediction': plan(...), 'tried': [(what,
    bytes needed)]}``. Nothing fits: ValueError with one line naming the smallest budget that would. ``plan_fn``
    replaces :func:`plan` (e.g. one that caches predictions)."""
    result = choose_each(model, [budget], device, candidates, plan_fn, **knobs)[0]
    if result["choice"] is None:
        raise (RuntimeError if result.get("unplanned") else ValueError)(result["error"])
    return result


def choose_each(
    model: Any,
    budgets: list[Any],
    device: str = "cuda",
    candidates: list[tuple[str, dict]] | None = None,
    plan_fn: Callable[..., dict] | None = None,
    **knobs: Any,
) -> list[dict]:
    """:func:`choose` for several budgets in one pass over the candidates: each budget's choice is the first
    candidate that fits it; the pass stops once every budget has one. A candidate is not planned when the frozen
    weights alone (the resident bytes of a planned candidate with the same base precision, + the CUDA context)
    exceed every open budget: no knob here changes them. Per budget: the :func:`choose` dict, or ``{'choice':
    None, 'needs_bytes': the smallest need, 'error': the one-line refusal, 'tried': ...}``; a candidate the planner
    cannot plan (a RuntimeError: the extrapolation refused) ends the search, its error in the open budgets' dicts
    (``'unplanned': True``)."""
    needs = [budget if isinstance(budget, int) else parse_budget(budget) for budget in budgets]
    if candidates is None:
        candidates = candidate_knobs(knobs, base_precisions=quantized_bases(model, device))
    run = plan_fn or plan
    tried: list[tuple[str, int]] = []
    floors: dict[Any, int] = {}  # base precision -> bytes its frozen weights need alone
    skipped: list[tuple[str, dict, int]] = []
    chosen: dict[int, dict] = {}
    name = getattr(model, "name", model)
    for what, setting in candidates:
        open_needs = [n for n in needs if n not in chosen]
        if not open_needs:
            break
        floor = floors.get(setting.get("base_precision"))
        if floor is not None and floor > max(open_needs):
            skipped.append((what, setting, floor))
            continue
        try:
            prediction = run(model, device=device, **setting)
        except RuntimeError as err:  # the extrapolation refused (the peak moves between phases with depth)
            line = f"--memory-budget: could not plan {what!r}: {err}"
            return [chosen.get(n) or {"choice": None, "needs_bytes": None, "tried": list(tried), "error": line,
                                      "unplanned": True} for n in needs]  # fmt: skip
        name, need = prediction["model"], fits(prediction)
        tried.append((what, need))
        if "resident" in prediction:
            floors[setting.get("base_precision")] = (
                sum(prediction["resident"].values()) + prediction["cuda_context_bytes"]
            )
        for n in open_needs:
            if need <= n:
                chosen[n] = {"choice": what, "prediction": prediction, "tried": list(tried)}
    if len(chosen) < len(set(needs)):  # the smallest need: skipped settings are planned where they might be smaller
        for what, setting, floor in skipped:
            if floor < min(b for _, b in tried):
                tried.append((what, fits(run(model, device=device, **setting))))
    smallest = min(b for _, b in tried)
    refusal = lambda n: {
        "choice": None,
        "needs_bytes": smallest,
        "tried": list(tried),
        "error": f"--memory-budget: nothing fits {n / GIB:.1f} GiB for {name} {knobs.get('method', 'dam')}; "
        f"the smallest budget that would is {math.ceil(smallest / GIB * 10) / 10:.1f} GiB",
    }
    return [chosen[n] if n in chosen else refusal(n) for n in needs]


def format_table(prediction: dict) -> str:
    """The prediction as a plain-text table (GiB): resident bytes, the update's peak by phase and by kind."""
    g = lambda b: f"{b / GIB:8.3f}"
    p = prediction
    lines = [
        f"{p['model']} ({p['kind']}), {p['knobs']['method']}, {p['device']} allocator: peak {g(p['total_bytes'])} GiB"
    ]
    lines.append("  resident before the update:")
    lines += [f"    {name:28s}{g(v)}" for name, v in p["resident"].items() if v]
    u = p["update"]
    lines.append(f"  the update's peak above that: {g(u['peak_bytes'])} (in phase {u['peak_phase']})")
    lines.append("    by kind at the peak:")
    lines += [f"      {name:26s}{g(v)}" for name, v in u["kinds"].items()]
    lines.append("    peak by phase:")
    lines += [f"      {name:26s}{g(v)}" for name, v in u["phases"].items() if v]
    if u.get("offloaded_bytes"):
        where = "not on the GPU" if p["device"] == "cuda" else "counted above: CPU memory"
        lines.append(f"  stored trajectory offloaded to pinned CPU memory ({where}): {g(u['offloaded_bytes'])}")
    if p["device"] == "cuda":
        lines.append(f"  CUDA context (outside max_memory_allocated): {g(p['cuda_context_bytes'])}")
        lines.append(f"  reserved by the caching allocator (estimate): {g(p['reserved_bytes'])}")
    if p.get("text_encoder_bytes"):
        lines.append(
            f"  text encoders (loaded once to encode the prompts, freed before training): {g(p['text_encoder_bytes'])}"
        )
    lines.append(f"  ({p['seconds']} s to plan)")
    return "\n".join(lines)
