"""Drops the log lines that importing torchao prints, directly or through diffusers', peft's or transformers'
torchao probes, none of which says anything about a flowkern run:

- ``torchao``: "Failed to load .../torchao/_C_*.so: ..." (optional CUDA kernels a CPU or older-GPU wheel cannot load;
  the quantization flowkern uses does not need them, ``flowkern.models.quantize`` checks what it does need);
- ``torch.utils._pytree``: "<enum ...> is an Enum subclass and is now natively supported ..." for torchao's enums
  (a deprecation notice to torchao);
- ``diffusers.quantizers.torchao.torchao_quantizer``: "Unable to import `torchao` Tensor objects ..." (diffusers
  registers torchao classes that newer torchao moved; only loading torchao-serialized checkpoints needs them).

Each filter matches that one message on that one logger, so every other warning of these libraries still shows.
``flowkern/__init__.py`` installs them, before any entry point (the CLI, the model and reward modules) imports one of
these libraries. Stdlib only: importing this module imports none of them.
"""

from __future__ import annotations

import logging


class _DropTorchaoSharedLibraryFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load ") and "torchao" in message and ".so" in message)


class _DropTorchaoEnumDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
        module = getattr(cls, "__module__", None) or ""
        return not ("is an Enum subclass" in str(record.msg) and module.split(".")[0] == "torchao")


class _DropDiffusersTorchaoTensorImport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unable to import `torchao` Tensor objects")


# logger name -> the filter of its one torchao import message (module-level instances: installing twice is a no-op)
FILTERS = {
    "torchao": _DropTorchaoSharedLibraryFailures(),
    "torch.utils._pytree": _DropTorchaoEnumDeprecation(),
    "diffusers.quantizers.torchao.torchao_quantizer": _DropDiffusersTorchaoTensorImport(),
}


def silence_torchao_import_noise() -> None:
    """Install the filters (idempotent). A logger's filters see only the records logged on that very logger."""
    for name, drop in FILTERS.items():
        logging.getLogger(name).addFilter(drop)
