"""Shared machinery of the diffusers-transformer `FlowModel` adapters (SD3, FLUX.1, FLUX.2, SiT).

An adapter subclasses `TransformerFlowModel` and supplies only what differs per backbone: the state check,
the per-branch conditioning inputs, and `_forward` (the one place its convention is converted to paper time,
M1/M3). Everything else is common:

- CFG (M5) as one [2B] batch, uncond first, combined v = v_u + w (v_c - v_u) like `flowkern.ops.cfg_euler`;
- ``detach_uncond`` (M5): the unconditional branch's *parameter* path is detached, its state path kept;
- ``base_velocity()``: LoRA off (`flowkern.models.lora.lora_disabled`), restored even on error;
- loading (local directory or hub id, ``subfolder``), bf16 (or int8/fp8 weight-only, `flowkern.models.quantize`)
  frozen weights with fp32 LoRA, LoRA save/load,
  gradient checkpointing whose recomputation sees the LoRA on/off state of its forward (a VJP of the base velocity
  runs its backward after ``base_velocity()`` has exited).

Dtypes: states, embeddings and the returned velocity keep the caller's dtype; inputs are cast to the weights'
dtype for the call and the output back; timesteps are formed in fp64 from t and passed in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flowkern.models.lora import (
    DEFAULT_TARGETS,
    add_lora,
    load_lora,
    lora_disabled,
    lora_parameters,
    lora_state,
    lora_state_as,
)

__all__ = [
    "RECOMPUTE",
    "TransformerFlowModel",
    "check_guidance_scale",
    "check_last_dim",
    "check_recompute",
    "check_tensor",
    "paper_time",
    "shape_of",
]


def shape_of(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def check_tensor(name: str, x: object, dims: int, batch: int | None = None, floating: bool = True) -> torch.Tensor:
    """``x`` must be a ``dims``-dimensional (floating) tensor with leading size ``batch``; ValueError otherwise."""
    what = f"[B{', ...' * (dims - 1)}]" if batch is None else f"{dims}-dim with B={batch}"
    if not isinstance(x, torch.Tensor) or x.dim() != dims or (batch is not None and x.shape[0] != batch):
        raise ValueError(f"{name} must be a {what} tensor, got {shape_of(x)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    return x


def check_guidance_scale(value: object) -> float | None:
    """The CFG weight w (M5): None (no CFG) or a finite float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not torch.isfinite(torch.tensor(value)):
        raise ValueError(f"guidance_scale must be None or a finite float (the CFG weight w, M5), got {value!r}")
    return float(value)


def check_last_dim(name: str, x: torch.Tensor, config: Any, key: str) -> None:
    """``x``'s last dimension must equal ``config.<key>`` (a conditioning tensor against the transformer's config)."""
    expected = getattr(config, key)
    if x.shape[-1] != expected:
        raise ValueError(f"{name} must have last dim {key}={expected}, got {tuple(x.shape)}")


def paper_time(t: torch.Tensor | float, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Paper time ``t`` (0-dim, [1] or [B]; t=0 noise, t=1 data, M1) as an fp64 [B] tensor (differentiable)."""
    t = torch.as_tensor(t, device=device)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"t must be 0-dim or [B] with B={batch}, got shape {tuple(t.shape)}")
    return t.to(torch.float64).reshape(-1).expand(batch)


@contextlib.contextmanager
def _parameters_as(entries: list[tuple[nn.Module, str, torch.Tensor]]) -> Iterator[None]:
    """Inside, ``module._parameters[name]`` is the given tensor (as ``torch.func.functional_call`` swaps them)."""
    previous = [(module, name, module._parameters[name]) for module, name, _ in entries]
    for module, name, tensor in entries:
        module._parameters[name] = tensor
    try:
        yield
    finally:
        for module, name, tensor in previous:
            module._parameters[name] = tensor


def _forward_state_contexts(
    module: nn.Module,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """checkpoint's context_fn: nothing around the forward; around the recomputation the block as its forward saw
    it: the LoRA on/off flags (``base_velocity()`` has exited by then) and the parameter tensors (``velocity``'s
    unconditional branch runs through ``functional_call`` with detached parameters, M5)."""
    params = [(sub, name, p) for sub in module.modules() for name, p in sub._parameters.items() if p is not None]
    return contextlib.nullcontext(), _recompute_as(lora_state(module), params)


@contextlib.contextmanager
def _recompute_as(lora: list, params: list) -> Iterator[None]:
    with lora_state_as(lora), _parameters_as(params):
        yield


# how finely the backward recomputes the backbone (``set_recompute``); the children of a diffusers SD3 / FLUX.1 /
# FLUX.2 / DiT block that are its attention and its MLP (FLUX.1's single block computes its MLP inline, FLUX.2's
# single block fuses it into ``attn``: there the attention is the one sublayer)
RECOMPUTE = ("none", "block", "sublayer")
SUBLAYERS = ("attn", "attn1", "attn2", "ff", "ff_context")


def check_recompute(value: object) -> str:
    if value not in RECOMPUTE:
        raise ValueError(f"--recompute: expected one of {', '.join(RECOMPUTE)}, got {value!r}")
    return value


def _checkpointed_sublayer(module: nn.Module, *args, **kwargs) -> Any:
    """A sublayer's forward under grad: non-reentrant checkpoint, recomputed with its forward's LoRA state. No RNG
    state is stashed (5 kB per call on the CPU): the adapters keep the transformer in eval mode, no dropout."""
    forward = functools.partial(type(module).forward, module)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    context = functools.partial(_forward_state_contexts, module)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context, preserve_rng_state=False, **kwargs)


class TransformerFlowModel(nn.Module):
    """Base of the diffusers-transformer adapters; see the module docstring. Subclasses set
    ``transformer_class`` (the diffusers class name) and ``conditioning_type``, and implement
    ``_check_state(x)``, ``_forward(x, t, inputs, call)``; ``_branch_inputs(cond, uncond)`` defaults to
    ``cond.branch(uncond)``, a dict of [B]-leading tensors for one CFG branch.

    - ``velocity(x, t, cond)``: x the sampler state, t 0-dim or [B]; the CFG-combined v (M5) in x's dtype.
    - ``velocity_pair(x, t, cond)``: (v_u, v_c) from the [2B] batch (for ``sample_euler(..., guidance_scale=w)``).
    - ``branches(x2, t, cond)``: [2B] states (uncond half first) -> [v_u; v_c] (the lean adjoint's CFG form).
    - ``base_velocity()``: LoRA off, restored on exit even on error. ``trainable_parameters()``: the fp32 LoRA.
    """

    transformer_class: ClassVar[str] = ""
    conditioning_type: ClassVar[type] = object
    default_lora_targets: ClassVar[tuple[str, ...]] = DEFAULT_TARGETS

    def __init__(self, transformer: nn.Module, *, gradient_checkpointing: bool = False):
        super().__init__()
        if self.transformer_class:
            import diffusers

            if not isinstance(transformer, getattr(diffusers, self.transformer_class)):
                raise TypeError(
                    f"{type(self).__name__} wraps a diffusers {self.transformer_class}, "
                    f"got {type(transformer).__name__}"
                )
        self.transformer = transformer.eval()  # train mode would enable dropout (DiT label dropout is random)
        for name, p in self.transformer.named_parameters():
            if "lora_" not in name:
                p.requires_grad_(False)
        self.set_gradient_checkpointing(gradient_checkpointing)

    # ------------------------------------------------------------------ loading / LoRA
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = "transformer",
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool = False,
        device: torch.device | str | None = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] | None = None,
        lora_path: str | os.PathLike | None = None,
        gradient_checkpointing: bool = False,
        adapter_kwargs: Mapping[str, Any] | None = None,
        base_precision: str | None = None,
        **kwargs,
    ) -> TransformerFlowModel:
        """Load the transformer from a local pipeline/transformer directory or a hub id (``subfolder=None`` for a
        bare transformer directory); ``torch_dtype`` sets the frozen weights' dtype (e.g. bf16). With
        ``lora_rank`` a LoRA with fp32 parameters is attached (targets default to ``default_lora_targets``) and
        ``lora_path`` (a `save_lora` directory/file) loads its weights. ``adapter_kwargs`` go to the adapter's
        constructor, other ``kwargs`` to diffusers' ``from_pretrained`` (``revision``, ``cache_dir``, ...).

        ``base_precision`` ('bf16', 'int8', 'fp8'; `flowkern.models.quantize`): the frozen linears stored weight-only
        in int8/fp8 (quantized on the CPU before the move to ``device``), computing in ``torch_dtype`` (default bf16);
        'bf16' is ``torch_dtype=torch.bfloat16`` unquantized. The LoRA is attached afterwards, on top, in fp32.
        """
        import diffusers

        from flowkern.models.quantize import check_base_precision, quantize_base

        if lora_path is not None and lora_rank is None:
            raise ValueError("lora_path needs lora_rank (and lora_alpha if it differs from the rank)")
        if base_precision is not None:
            check_base_precision(base_precision)
            if base_precision == "bf16" and torch_dtype not in (None, torch.bfloat16):
                raise ValueError(f"base_precision='bf16' loads bf16 weights, but torch_dtype={torch_dtype}")
            torch_dtype = torch_dtype or torch.bfloat16
        if subfolder is not None:
            kwargs["subfolder"] = subfolder
        transformer = getattr(diffusers, cls.transformer_class).from_pretrained(
            pretrained_model_name_or_path, torch_dtype=torch_dtype, local_files_only=local_files_only, **kwargs
        )
        if base_precision is not None:
            quantize_base(transformer.requires_grad_(False), base_precision)  # frozen, as the constructor leaves it
        if device is not None:
            transformer = transformer.to(device)
        model = cls(transformer, gradient_checkpointing=gradient_checkpointing, **dict(adapter_kwargs or {}))
        if lora_rank is not None:
            model.add_lora(lora_rank, lora_alpha, lora_target_modules)
            if lora_path is not None:
                load_lora(model.transformer, lora_path)
        return model

    def add_lora(
        self, rank: int, alpha: float | None = None, target_modules: Sequence[str] | None = None, **kwargs
    ) -> list[nn.Parameter]:
        """Attach a peft LoRA with fp32 parameters (`flowkern.models.lora.add_lora`)."""
        targets = self.default_lora_targets if target_modules is None else target_modules
        return add_lora(self.transformer, rank, alpha, targets, **kwargs)

    def save_lora(self, path: str | os.PathLike, **kwargs) -> str:
        """Write the LoRA in diffusers' format (`flowkern.models.lora.save_lora`); returns the file."""
        from flowkern.models.lora import save_lora

        return save_lora(self.transformer, path, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in lora_parameters(self.transformer) if p.requires_grad]

    def _sublayers(self) -> list[nn.Module]:
        blocks = [b for name in ("transformer_blocks", "single_transformer_blocks")
                  for b in getattr(self.transformer, name, ())]  # fmt: skip
        return [sub for block in blocks for name, sub in block.named_children() if name in SUBLAYERS]

    def set_recompute(self, granularity: str) -> None:
        """How finely the backward recomputes the backbone (``flowkern train --recompute``):

        - 'none': every block's activations kept for the backward (fastest, largest);
        - 'block': one checkpoint per transformer block (diffusers' loop; `checkpoint_block`): the stored inputs of
          every block plus one block's activations while it is recomputed;
        - 'sublayer': 'block', and inside each block its attention and its MLP (:data:`SUBLAYERS`) checkpointed
          again, so a block's recomputation keeps one sublayer's internals (q/k/v, the attention output, the MLP's
          hidden) instead of all of them; those sublayers run a third time (the lower peak costs ~1 forward more).

        Every recomputation sees the LoRA on/off state and the parameters of its forward (`_forward_state_contexts`).
        """
        check_recompute(granularity)
        self.set_gradient_checkpointing(granularity != "none")
        for sub in self._sublayers():
            patched = isinstance(sub.__dict__.get("forward"), functools.partial)
            if granularity == "sublayer" and not patched:
                sub.forward = functools.partial(_checkpointed_sublayer, sub)
            elif granularity != "sublayer" and patched:
                del sub.forward

    @property
    def recompute(self) -> str:
        """The current `set_recompute` granularity."""
        if not getattr(self.transformer, "gradient_checkpointing", False):
            return "none"
        subs = self._sublayers()
        return "sublayer" if subs and isinstance(subs[0].__dict__.get("forward"), functools.partial) else "block"

    def set_gradient_checkpointing(self, enabled: bool, gradient_checkpointing_func: Callable | None = None) -> None:
        """Switch diffusers' per-block gradient checkpointing (``fn(module, *args)``, active only under grad).

        The default ``fn`` is `checkpoint_block`: non-reentrant, recomputing each block with the LoRA on/off
        state and parameters of its forward. A custom ``fn`` must do the same if the model's backward can run
        outside ``base_velocity()`` (the lean adjoint's VJPs, VGG-Flow's 'exact' T3) or ``velocity`` detaches the
        unconditional branch's parameters with a state gradient (DRaFT's truncated adjoint)."""
        if enabled:
            func = gradient_checkpointing_func or self.checkpoint_block
            self.transformer.enable_gradient_checkpointing(gradient_checkpointing_func=func)
        elif getattr(self.transformer, "gradient_checkpointing", False):
            self.transformer.disable_gradient_checkpointing()

    @staticmethod
    def checkpoint_block(module: nn.Module, *args) -> Any:
        """``torch.utils.checkpoint`` (non-reentrant) of one block whose recomputation restores the block's LoRA
        on/off flags and parameter tensors as they were in the forward (`_forward_state_contexts`)."""
        return checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=functools.partial(_forward_state_contexts, module)
        )

    @contextlib.contextmanager
    def base_velocity(self) -> Iterator[None]:
        """Inside, ``velocity`` is the frozen base model (LoRA off); restored on exit, even on error."""
        with lora_disabled(self.transformer):
            yield

    @property
    def base_precision(self) -> str:
        """How the frozen weights are stored: 'int8' / 'fp8' (quantized linears) or their dtype ('bf16', 'fp32')."""
        from flowkern.models.quantize import base_precision_of

        return base_precision_of(self.transformer)

    @property
    def dtype(self) -> torch.dtype:
        """The frozen weights' (compute) dtype, also of a quantized base (the LoRA is fp32)."""
        return next(p.dtype for n, p in self.transformer.named_parameters() if "lora_" not in n)

    # ------------------------------------------------------------------ per-backbone hooks
    def _check_state(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _check_cond(self, cond: Any) -> None:
        """Backbone-specific checks of the conditioning (dimensions, label range); default none."""

    def _branch_inputs(self, cond: Any, uncond: bool) -> dict[str, torch.Tensor]:
        return cond.branch(uncond)

    def _forward(
        self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, torch.Tensor], call: Callable[..., Any]
    ) -> torch.Tensor:
        """v in paper time for states ``x`` [n, ...], fp64 ``t`` [n] and one branch's ``inputs``;
        ``call(**kwargs)`` runs the transformer and returns its first output."""
        raise NotImplementedError

    # ------------------------------------------------------------------ velocities
    def _call(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        inputs: dict[str, torch.Tensor],
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        def call(**kwargs) -> torch.Tensor:
            kwargs["return_dict"] = False
            if params is None:
                return self.transformer(**kwargs)[0]
            return torch.func.functional_call(self.transformer, params, (), kwargs, strict=False)[0]

        return self._forward(x, paper_time(t, x.shape[0], x.device), inputs, call)

    def _check(self, x: torch.Tensor, cond: Any) -> None:
        if not isinstance(cond, self.conditioning_type):
            raise TypeError(f"cond must be a {self.conditioning_type.__name__}, got {type(cond).__name__}")
        self._check_state(x)
        if x.shape[0] != cond.batch_size:
            raise ValueError(f"x has batch {x.shape[0]} but cond has batch {cond.batch_size}")
        self._check_cond(cond)

    def _cfg_inputs(self, cond: Any) -> dict[str, torch.Tensor]:
        """[2B] inputs for the CFG batch, uncond first (M5)."""
        u, c = self._branch_inputs(cond, True), self._branch_inputs(cond, False)
        return {k: torch.cat([u[k], c[k]]) for k in c}

    @staticmethod
    def _t2(t: torch.Tensor | float, batch: int) -> torch.Tensor:
        """The time of a [2B] batch: a [B] t is repeated, a 0-dim or [2B] t kept."""
        t = torch.as_tensor(t)
        return torch.cat([t, t]) if t.dim() == 1 and t.shape[0] == batch and batch > 1 else t

    def branches(self, x2: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """[2B] states (uncond half first) -> [v_u; v_c] [2B] (M5)."""
        if not isinstance(cond, self.conditioning_type) or not cond.cfg:
            raise ValueError(f"branches() needs a {self.conditioning_type.__name__} with guidance_scale (CFG)")
        if not isinstance(x2, torch.Tensor) or x2.shape[0] != 2 * cond.batch_size:
            raise ValueError(f"x2 must be the [2B] CFG batch with B={cond.batch_size}, got {shape_of(x2)}")
        self._check_state(x2)
        self._check_cond(cond)
        return self._call(x2, self._t2(t, cond.batch_size), self._cfg_inputs(cond))

    def velocity_pair(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_u, v_c), both [B, ...], from one [2B] batch (uncond first)."""
        self._check(x, cond)
        v_u, v_c = self.branches(torch.cat([x, x]), t, cond).chunk(2)
        return v_u, v_c

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any, *, detach_uncond: bool = False) -> torch.Tensor:
        """The (CFG-combined, M5) velocity in paper time.

        ``detach_uncond`` (M5): d v/d theta = w dv_c/d theta while d v/d x = (1 - w) J_u + w J_c. Without grad
        this is one [2B] batch. Under grad, two B-batches: when nothing upstream carries a gradient v_u runs under
        ``no_grad`` (it would be detached anyway: no graph is kept for it); otherwise v_u is recomputed with the
        trainable parameters detached, keeping its state path.
        """
        self._check(x, cond)
        if not cond.cfg:
            return self._call(x, t, self._branch_inputs(cond, False))
        w = cond.guidance_scale
        upstream = [x, t, *cond.tensors()]
        needs_state_grad = any(isinstance(v, torch.Tensor) and v.requires_grad for v in upstream)
        if detach_uncond and torch.is_grad_enabled():
            if needs_state_grad:
                frozen = {n: p.detach() for n, p in self.transformer.named_parameters() if p.requires_grad}
                v_u = self._call(x, t, self._branch_inputs(cond, True), frozen)
            else:
                with torch.no_grad():
                    v_u = self._call(x, t, self._branch_inputs(cond, True))
            v_c = self._call(x, t, self._branch_inputs(cond, False))
        else:
            v_u, v_c = self.velocity_pair(x, t, cond)
            if detach_uncond:
                v_u = v_u.detach()
        return v_u + w * (v_c - v_u)  # (M5), the combine of ops.cfg_euler

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.velocity(x, t, cond)
