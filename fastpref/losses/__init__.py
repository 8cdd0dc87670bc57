"""Level 3: preference losses on per-sequence tensors (plain differentiable PyTorch), and the registry."""

from .listwise import dpo_plackett_luce_loss, lipo_lambda_loss, lipo_lambda_weights, list_mle_loss, pro_loss
from .mallows import (
    calibrate_dispersion_c,
    kendall_link,
    mallows_dpo_loss,
    mallows_ipo_loss,
    mallows_phi_dpo_loss,
    neg_log_dispersion,
)
from .mppo import (
    mppo_list_mle_loss,
    mppo_pair_mcm_loss,
    mppo_pair_mcs_loss,
    mppo_pair_mnm_loss,
    mppo_pair_mns_loss,
    mppo_pair_single_loss,
    mppo_point_ce_loss,
    mppo_point_mse_loss,
)
from .pairwise import dpo_loss, dpop_loss, f_divergence_scores, mmpo_loss, todo_loss
from .reference_free import cpo_loss, orpo_log_odds, orpo_loss, simpo_loss
from .registry import (
    LAYOUTS,
    LOSSES,
    GroupBatch,
    ListLossResult,
    LossResult,
    LossSpec,
    PairBatch,
    UnpairedBatch,
    available_losses,
    get_loss,
    register,
)
from .token_level import tdpo1_loss, tdpo2_loss, tdpo_loss
from .unpaired import kto_kl_estimate, kto_loss
from .wpo import wpo_weights

__all__ = [
    "LAYOUTS", "LOSSES", "GroupBatch", "ListLossResult", "LossResult", "LossSpec", "PairBatch", "UnpairedBatch",
    "available_losses", "calibrate_dispersion_c", "cpo_loss", "dpo_loss", "dpo_plackett_luce_loss", "dpop_loss",
    "f_divergence_scores", "get_loss", "kendall_link", "kto_kl_estimate", "kto_loss", "lipo_lambda_loss",
    "lipo_lambda_weights", "list_mle_loss", "mallows_dpo_loss", "mallows_ipo_loss", "mallows_phi_dpo_loss",
    "mmpo_loss", "mppo_list_mle_loss", "mppo_pair_mcm_loss", "mppo_pair_mcs_loss", "mppo_pair_mnm_loss",
    "mppo_pair_mns_loss", "mppo_pair_single_loss", "mppo_point_ce_loss", "mppo_point_mse_loss",
    "neg_log_dispersion", "orpo_log_odds", "orpo_loss", "pro_loss", "register", "simpo_loss", "tdpo1_loss",
    "tdpo2_loss", "tdpo_loss", "todo_loss", "wpo_weights",
]
