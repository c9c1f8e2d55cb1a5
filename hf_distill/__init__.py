"""hf_distill: knowledge distillation for Hugging Face Transformers."""

from .config import DistillationConfig
from .loss import LOSS_TYPES, DistillationLoss, distillation_loss
from .trainer import DistillationTrainer

__version__ = "0.1.0"
__all__ = ["DistillationConfig", "DistillationTrainer", "distillation_loss", "DistillationLoss", "LOSS_TYPES", "__version__"]
