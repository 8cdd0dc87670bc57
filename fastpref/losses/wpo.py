"""WPO weighting (Zhou et al., 2024; TRL ``DPOConfig(use_weighting=True)``).

Re-weights each preference pair by how likely the policy is to produce both responses itself:
``w(y) = exp(mean_t [logp_t - log sum_v p_t(v)^2])``, computed without gradient; the per-pair loss
is multiplied by ``w(y_w) * w(y_l)``. ``log sum_v p_t(v)^2`` comes from level 1
(``token_stats(..., log_sum_sq_probs=True)``; per sequence ``SequenceStats.mean_log_sum_sq_probs``).
The fused front door applies it to any pairwise loss with the hyperparameter ``use_weighting=True``.
"""

from __future__ import annotations

import torch

from .. import _checks


def wpo_weights(mean_logps: torch.Tensor, mean_log_sum_sq_probs: torch.Tensor) -> torch.Tensor:
    r"""Per-sequence WPO weights ``exp(A - mean_t log sum_v p_t(v)^2)`` (detached).

    ``mean_logps``: per-token MEAN policy log-probs ``A``; ``mean_log_sum_sq_probs``: the per-token
    mean of ``log sum_v p_t(v)^2`` over the same tokens. Since ``sum_v p_t(v)^2 = E_{v ~ p_t}[p_t(v)]``,
    each term compares the token's probability with that of a token the policy itself samples; the
    weight can exceed 1 (TRL <= 0.22 clamped the pair weight at 1; TRL >= 0.29 does not, nor does
    fastpref).
    """
    _checks.per_example("mean_logps", mean_logps)
    _checks.per_example("mean_log_sum_sq_probs", mean_log_sum_sq_probs, mean_logps, like_name="mean_logps")
    return torch.exp(mean_logps.detach().float() - mean_log_sum_sq_probs.detach().float())
