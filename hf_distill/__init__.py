"""hf_distill: knowledge distillation for Hugging Face Transformers."""

from .config import DistillationConfig
from .losses import LOSS_TYPES, distillation_loss
from .trainer import DistillationTrainer

__version__ = "0.1.0"
__all__ = ["DistillationConfig", "DistillationTrainer", "distillation_loss", "LOSS_TYPES", "__version__"]
