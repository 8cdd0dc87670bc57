"""Level 3: preference losses on per-sequence tensors (plain differentiable PyTorch), and the registry."""

from .mallows import (
    calibrate_dispersion_c,
    kendall_link,
    mallows_dpo_loss,
    mallows_ipo_loss,
    mallows_phi_dpo_loss,
    neg_log_dispersion,
)
from .pairwise import dpo_loss, dpop_loss, f_divergence_scores, mmpo_loss, todo_loss
from .reference_free import cpo_loss, orpo_log_odds, orpo_loss, simpo_loss
from .registry import LOSSES, LossResult, LossSpec, PairBatch, available_losses, get_loss, register

__all__ = [
    "LOSSES", "LossResult", "LossSpec", "PairBatch", "available_losses", "calibrate_dispersion_c", "cpo_loss",
    "dpo_loss", "dpop_loss", "f_divergence_scores", "get_loss", "kendall_link", "mallows_dpo_loss",
    "mallows_ipo_loss", "mallows_phi_dpo_loss", "mmpo_loss", "neg_log_dispersion", "orpo_log_odds", "orpo_loss",
    "register", "simpo_loss", "todo_loss",
]
