"""fastpref: fused, memory-efficient loss kernels for LLM preference optimisation.

Three levels, one heavy op:

1. :func:`token_stats` — per-token log-probs / entropies / reference KL straight from hidden states
   and the LM-head weight (chunked, fused, exact gradients, never the full logits);
2. :func:`sequence_logps` — per-sequence sums and means (padded or packed layouts);
3. the losses (:func:`dpo_loss`, :func:`mallows_dpo_loss`, ...) on per-sequence tensors, and
   :func:`preference_loss` / :class:`PreferenceLoss` that run any of them by name from the head.
"""

from .losses import (
    LossResult,
    LossSpec,
    PairBatch,
    available_losses,
    calibrate_dispersion_c,
    cpo_loss,
    dpo_loss,
    dpop_loss,
    f_divergence_scores,
    get_loss,
    kendall_link,
    mallows_dpo_loss,
    mallows_ipo_loss,
    mallows_phi_dpo_loss,
    mmpo_loss,
    neg_log_dispersion,
    orpo_log_odds,
    orpo_loss,
    register,
    simpo_loss,
    todo_loss,
)
from .modules import PreferenceLoss, PreferenceOutput, preference_loss
from .ops import TokenStats, backends, shift_labels, token_stats
from .segments import SequenceStats, reduce_tokens, sequence_logps

__version__ = "0.1.0"

__all__ = [
    "LossResult", "LossSpec", "PairBatch", "PreferenceLoss", "PreferenceOutput", "SequenceStats", "TokenStats",
    "available_losses", "backends", "calibrate_dispersion_c", "cpo_loss", "dpo_loss", "dpop_loss",
    "f_divergence_scores", "get_loss", "kendall_link", "mallows_dpo_loss", "mallows_ipo_loss",
    "mallows_phi_dpo_loss", "mmpo_loss", "neg_log_dispersion", "orpo_log_odds", "orpo_loss", "preference_loss",
    "reduce_tokens", "register", "sequence_logps", "shift_labels", "simpo_loss", "todo_loss", "token_stats",
]
