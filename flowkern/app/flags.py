"""Which ``flowkern train`` settings act for which method and which model kind: one table, checked in one place.

A setting that differs from its default but has no effect for the chosen method or model (``--K`` with VGG-Flow,
``--beta`` with ReFL, ``--resolution`` or ``--precision`` with the toy) is refused with one line naming where it
applies, instead of being silently ignored. Settings not listed act for every method and model. The columns mirror
what :func:`flowkern.app.build.build_method` and :func:`flowkern.app.build.load_model` read; a method/model
registry can take them over.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["FOR_METHODS", "FOR_MODELS", "check_applicable"]

IMAGE_MODELS = ("tiny", "sd3", "flux", "flux2", "sit")

FOR_METHODS = {  # setting -> the methods that read it
    "beta": ("vggflow", "dam", "am"),
    "lam": ("vggflow", "dam", "am"),
    "K": ("dam", "refl", "draft"),
    "p": ("dam",),
    "eta": ("vggflow",),
    "alpha": ("vggflow",),
    "subsample": ("vggflow",),
    "consistency": ("vggflow",),
    "value_lr": ("vggflow",),  # the only method with a value net
    "micro_batch": ("vggflow", "dam", "am"),  # ReFL and DRaFT-K backpropagate whole trajectories
}
FOR_MODELS = {  # setting -> the model kinds that read it (the toy has no LoRA, no pixels, no prompts)
    "lora_rank": IMAGE_MODELS,
    "lora_alpha": IMAGE_MODELS,
    "precision": IMAGE_MODELS,
    "base_precision": IMAGE_MODELS,
    "resolution": IMAGE_MODELS,
    "guidance_scale": IMAGE_MODELS,
    "reward_source": IMAGE_MODELS,
    "prompt": ("sd3", "flux", "flux2", "sit"),
    "prompt_cache": (
        "flux2",
    ),  # the text encoders whose embeddings flowkern.app.prompts caches  # the tiny model draws its own four prompts
}


def check_applicable(settings: Mapping, defaults: Mapping, method: str, kind: str) -> None:
    """ValueError (one line) listing every setting that differs from its default and does nothing for ``method``
    on a ``kind`` model."""
    problems = []
    for table, chosen, what in ((FOR_METHODS, method, "method"), (FOR_MODELS, kind, "model")):
        for name, users in table.items():
            if chosen not in users and settings.get(name) != defaults.get(name):
                problems.append(
                    f"--{name.replace('_', '-')} has no effect with {what} {chosen} (it applies to {', '.join(users)})"
                )
    if problems:
        raise ValueError("; ".join(problems) + ": leave it out")
