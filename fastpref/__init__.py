"""fastpref: fused, memory-efficient loss kernels for LLM preference optimisation.

Three levels, one heavy op:

1. :func:`token_stats` — per-token log-probs / entropies / reference KL straight from hidden states
   and the LM-head weight (chunked, fused, exact gradients, never the full logits);
2. :func:`sequence_logps` — per-sequence sums and means (padded or packed sequences, optional
   per-token weights), and :class:`Groups` for K responses per prompt;
3. the losses (:func:`dpo_loss`, :func:`mallows_dpo_loss`, :func:`pro_loss`, :func:`tdpo_loss`,
   :func:`kto_loss`, ...) on per-sequence tensors, and :func:`preference_loss` /
   :class:`PreferenceLoss` that run any of them by name from the head.
"""

from .losses import (
    GroupBatch,
    ListLossResult,
    LossResult,
    LossSpec,
    PairBatch,
    UnpairedBatch,
    available_losses,
    calibrate_dispersion_c,
    cpo_loss,
    dpo_loss,
    dpo_plackett_luce_loss,
    dpop_loss,
    f_divergence_scores,
    get_loss,
    kendall_link,
    kto_kl_estimate,
    kto_loss,
    lipo_lambda_loss,
    lipo_lambda_weights,
    list_mle_loss,
    mallows_dpo_loss,
    mallows_ipo_loss,
    mallows_phi_dpo_loss,
    mmpo_loss,
    mppo_list_mle_loss,
    mppo_pair_mcm_loss,
    mppo_pair_mcs_loss,
    mppo_pair_mnm_loss,
    mppo_pair_mns_loss,
    mppo_pair_single_loss,
    mppo_point_ce_loss,
    mppo_point_mse_loss,
    neg_log_dispersion,
    orpo_log_odds,
    orpo_loss,
    pro_loss,
    register,
    simpo_loss,
    tdpo1_loss,
    tdpo2_loss,
    tdpo_loss,
    todo_loss,
    wpo_weights,
)
from .modules import PreferenceLoss, PreferenceOutput, preference_loss
from .ops import TokenStats, backends, shift_labels, token_stats
from .segments import Groups, SequenceStats, reduce_tokens, sequence_logps

__version__ = "0.1.0"

__all__ = [
    "GroupBatch", "Groups", "ListLossResult", "LossResult", "LossSpec", "PairBatch", "PreferenceLoss",
    "PreferenceOutput", "SequenceStats", "TokenStats", "UnpairedBatch", "available_losses", "backends",
    "calibrate_dispersion_c", "cpo_loss", "dpo_loss", "dpo_plackett_luce_loss", "dpop_loss", "f_divergence_scores",
    "get_loss", "kendall_link", "kto_kl_estimate", "kto_loss", "lipo_lambda_loss", "lipo_lambda_weights",
    "list_mle_loss", "mallows_dpo_loss", "mallows_ipo_loss", "mallows_phi_dpo_loss", "mmpo_loss",
    "mppo_list_mle_loss", "mppo_pair_mcm_loss", "mppo_pair_mcs_loss", "mppo_pair_mnm_loss", "mppo_pair_mns_loss",
    "mppo_pair_single_loss", "mppo_point_ce_loss", "mppo_point_mse_loss", "neg_log_dispersion", "orpo_log_odds",
    "orpo_loss", "preference_loss", "pro_loss", "reduce_tokens", "register", "sequence_logps", "shift_labels",
    "simpo_loss", "tdpo1_loss", "tdpo2_loss", "tdpo_loss", "todo_loss", "token_stats", "wpo_weights",
]
