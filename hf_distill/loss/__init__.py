"""The distillation loss, in one package whose modules depend one way:

    objective  (DistillationLoss: the blend, built once by the trainer)
      → blended    (alpha·KD + (1−alpha)·CE, whole or chunked; applies T²)
          → closed_form  (chunk gradients without autograd)
          → buckets      (divergences against a cached top-k teacher)
              → divergences  (the math on log-probabilities, and the registry of loss types)
          → ensemble     (several teachers: their mixture, or the sum of their divergences)
      → cross_tokenizer  (a teacher with another tokenizer: ULD, or spans that line up over a shared vocabulary)
      → hidden     (the intermediate-layer term)
      → attention  (the attention-relation term)
"""

from .attention import AttentionStates, attention_relation_sum, relation_log_probs
from .blended import (
    LossSettings,
    PositionTargets,
    TeacherHidden,
    TeacherLogits,
    blended_loss,
    chunked_blended_loss,
    default_chunk_size,
    distillation_loss,
    token_divergence,
)
from .buckets import CachedTeacher, tail_log_mass, top_k_entries
from .cross_tokenizer import (
    CROSS_TOKENIZER,
    AlignedTeacher,
    aligned_response_masks,
    one_to_one_spans,
    shared_vocabulary,
    shared_vocabulary_divergence,
    uld_distance,
)
from .divergences import DIVERGENCES, LOSS_TYPES, Divergence, check_loss_settings, cross_entropy_per_position, loss_table
from .ensemble import MULTI_TEACHER, TeacherEnsemble, check_reduction, mixture_logits, normalized_weights
from .hidden import HIDDEN_LOSS_TYPES, default_layer_map
from .objective import DistillationLoss, LossOutput, StudentOutput, TeacherOutput

__all__ = [
    "AlignedTeacher", "AttentionStates", "CROSS_TOKENIZER", "CachedTeacher", "DIVERGENCES", "DistillationLoss", "Divergence", "HIDDEN_LOSS_TYPES", "LOSS_TYPES",
    "LossOutput", "LossSettings", "MULTI_TEACHER",
    "PositionTargets", "StudentOutput", "TeacherEnsemble", "TeacherHidden", "TeacherLogits", "TeacherOutput",
    "aligned_response_masks", "attention_relation_sum", "blended_loss", "mixture_logits", "normalized_weights", "one_to_one_spans", "relation_log_probs",
    "shared_vocabulary", "shared_vocabulary_divergence", "uld_distance",
    "check_loss_settings", "check_reduction", "chunked_blended_loss", "cross_entropy_per_position", "default_chunk_size",
    "default_layer_map", "distillation_loss", "loss_table", "tail_log_mass", "token_divergence", "top_k_entries",
]
