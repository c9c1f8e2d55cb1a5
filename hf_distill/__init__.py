"""hf_distill: knowledge distillation for Hugging Face Transformers."""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The public names load on first use, so `hf-distill --help` (which imports this package) needs no torch.
_EXPORTS = {
    "DistillationConfig": ".config",
    "DistillationTrainer": ".trainer",
    "distillation_loss": ".loss",
    "DistillationLoss": ".loss",
    "LOSS_TYPES": ".loss",
}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from .config import DistillationConfig
    from .loss import LOSS_TYPES, DistillationLoss, distillation_loss
    from .trainer import DistillationTrainer


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
