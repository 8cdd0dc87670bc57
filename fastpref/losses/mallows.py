"""MallowsPO (Chen et al., ICLR 2025): DPO with a per-prompt dispersion scale, and its variants.

The scale ``psi(x) = -log phi(x) > 0`` ("neg-log dispersion") multiplies the implicit-reward margin.
It is estimated from the REFERENCE model's next-token entropy on the two responses
(:func:`neg_log_dispersion`) and carries no gradient. ``psi == 1`` recovers DPO / IPO exactly.

Margin (official code; docs/losses.md, section ``mallows_dpo``), with ``r`` the (mean or summed) policy
log-prob::

    h = (r_w - r_l) - a (r_ref_w - r_ref_l) - (1 - a) gamma'      with reference mixing a
    h = (r_w - r_l) - (r_ref_w - r_ref_l) - gamma'                 otherwise

the reference term is dropped when no reference log-probs are given (the official default
``reference_free=True`` with mean log-probs is MallowsSimPO).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .. import _checks
from ._common import check_label_smoothing, check_pair, detached, reduce, smoothed_logistic
from .checks import check_choice, check_non_negative, check_number, check_positive, check_used
from .registry import LossResult, PairBatch, register

DISPERSION_ESTIMATORS = ("mean", "paper_sum")
IPO_FORMS = ("mallowspo", "rainbowpo", "rainbowpo_modified")
PHI_LINKS = ("kendall", "sigmoid")


# A mean token entropy is at most log V; fp32 rounding of a (near-)uniform reference can exceed it slightly.
_ROUNDING = 1e-3


def _normalised_entropy(chosen_entropy, rejected_entropy, vocab_size: int, dispersion: str) -> torch.Tensor:
    """``H_hat(x)`` in (0, 1): the reference entropy of the pair normalised by ``log V`` (so that psi > 0)."""
    check_choice("dispersion", dispersion, DISPERSION_ESTIMATORS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        _checks.fail("vocab_size", f"must be an int >= 2, got {vocab_size!r}")
    _checks.per_example("chosen_entropy", chosen_entropy)
    _checks.per_example("rejected_entropy", rejected_entropy, chosen_entropy, like_name="chosen_entropy")
    # "mean": per-sequence mean token entropies, each / log V, averaged (official code).
    # "paper_sum": summed token entropies of both responses / (2 log V) (paper; not length-invariant).
    chosen, rejected = chosen_entropy.detach().float(), rejected_entropy.detach().float()
    h_hat = (chosen + rejected) / (2 * math.log(vocab_size))
    limit = 1 + _ROUNDING if dispersion == "mean" else 1.0
    negative, nonfinite, too_big = torch.stack([
        ((chosen < 0) | (rejected < 0)).any(), ~torch.isfinite(h_hat).all(), (h_hat >= limit).any()]).tolist()
    if negative or nonfinite:
        _checks.fail("chosen_entropy", "and `rejected_entropy` must be finite and non-negative (nats)")
    if too_big and dispersion == "mean":
        _checks.fail("chosen_entropy", f"and `rejected_entropy` exceed log V = {math.log(vocab_size):.4g} for some "
                                       "pairs, which per-token MEAN entropies cannot: they look SUMMED over the "
                                       "tokens. Pass means (divide by the token counts), or dispersion='paper_sum' "
                                       "(the paper's estimator for summed entropies)")
    if too_big:
        _checks.fail("dispersion", "='paper_sum' gives psi <= 0 for some pairs: their summed entropies exceed "
                                   "log V (long responses), which would flip the loss. Use dispersion='mean' "
                                   "with per-token mean entropies (the official estimator)")
    return h_hat.clamp(max=1 - 1e-6)  # rounding above log V: a (near-)uniform reference, psi ~ 0


def neg_log_dispersion(
    chosen_entropy: torch.Tensor,
    rejected_entropy: torch.Tensor,
    *,
    vocab_size: int,
    c: float = 0.29,
    dispersion: str = "mean",
) -> torch.Tensor:
    r"""MallowsPO's per-prompt scale ``psi(x) = -c log H_hat(x)`` from reference-model entropies (detached).

    Args:
        chosen_entropy, rejected_entropy: ``[B]`` reference next-token entropies (nats) of the chosen
            and rejected responses: per-sequence MEAN token entropies for ``dispersion="mean"`` (the
            official code's estimator, default), per-sequence SUMMED token entropies for
            ``"paper_sum"`` (the paper's estimator; it can exceed 1 inside the log for long responses,
            making psi negative and flipping the loss).
        vocab_size: ``V``, the width of the logits (including padded vocabulary rows).
        c: scale; 0.29 is the official constant (set offline so that the dataset mean of psi is ~1;
            see :func:`calibrate_dispersion_c`).

    ``H_hat = (Hn_w + Hn_l) / 2`` with ``Hn = H / log V``; an entropy of 0 is clamped to 1e-12. psi
    must be positive: mean entropies above ``log V`` (summed ones passed as means) and ``"paper_sum"``
    entropies giving ``H_hat >= 1`` are refused, saying which estimator fits.
    """
    check_positive("c", c)
    h_hat = _normalised_entropy(chosen_entropy, rejected_entropy, vocab_size, dispersion)
    return -c * torch.log(h_hat.clamp(min=1e-12))


def calibrate_dispersion_c(
    chosen_entropy: torch.Tensor | Iterable[tuple[torch.Tensor, torch.Tensor]],
    rejected_entropy: torch.Tensor | None = None,
    *,
    vocab_size: int,
    dispersion: str = "mean",
) -> float:
    """The ``c`` that makes the mean of :func:`neg_log_dispersion` over a dataset equal to 1.

    Pass all entropies as two tensors, or an iterable of ``(chosen_entropy, rejected_entropy)``
    batches (a dataset pass with the reference model, e.g. from :func:`fastpref.sequence_logps` with
    ``ref_entropy=True``): ``c = 1 / mean(-log H_hat)``.
    """
    if isinstance(chosen_entropy, torch.Tensor) and rejected_entropy is None:
        _checks.fail("rejected_entropy", "is required with a `chosen_entropy` tensor (or pass an iterable of "
                                         "(chosen_entropy, rejected_entropy) batches)")
    batches = [(chosen_entropy, rejected_entropy)] if rejected_entropy is not None else list(chosen_entropy)
    total, count = 0.0, 0
    for chosen, rejected in batches:
        psi = neg_log_dispersion(chosen, rejected, vocab_size=vocab_size, c=1.0, dispersion=dispersion)
        total += psi.double().sum().item()
        count += psi.numel()
    if count == 0:
        _checks.fail("chosen_entropy", "is empty: nothing to calibrate on")
    if total <= 0:
        _checks.fail("chosen_entropy", "gives a non-positive mean -log H_hat; c cannot make psi positive")
    return count / total


def mallows_margin(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, home_advantage, mixing_alpha
) -> torch.Tensor:
    """The margin ``h`` of the module docstring (reference term dropped when there is no reference)."""
    ref_weight, gamma_weight = (1.0, 1.0) if mixing_alpha is None else (mixing_alpha, 1.0 - mixing_alpha)
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if ref_chosen_logps is not None:  # same operation order as dpo_loss, so psi = 1 matches it bit for bit
        chosen, rejected = chosen - ref_weight * ref_chosen_logps, rejected - ref_weight * ref_rejected_logps
    return chosen - rejected - gamma_weight * home_advantage


def _rewards(beta, pc, pr, rc, rr):
    """Official metrics: beta * (r - r_ref), without psi (beta * r when there is no reference)."""
    chosen = pc if rc is None else pc - rc
    rejected = pr if rr is None else pr - rr
    return detached(beta * chosen, beta * rejected)


def _any_nonzero(x) -> bool:
    return bool((x != 0).any()) if isinstance(x, torch.Tensor) else x != 0


def _check_mallows(pc, pr, rc, rr, psi, beta, mixing_alpha, home_advantage):
    check_pair(pc, pr, rc, rr)
    check_positive("beta", beta, like=pc)
    if isinstance(psi, torch.Tensor) and psi.dim() > 0:
        _checks.per_example("neg_log_dispersion", psi, pc)
    check_positive("neg_log_dispersion", psi)  # psi = -log(phi) > 0; psi <= 0 would flip or flatten the loss
    if mixing_alpha is not None:
        check_number("mixing_alpha", mixing_alpha, low=0, high=1, like=pc)
    check_non_negative("home_advantage", home_advantage, like=pc)
    # h = (r_w - a r_ref,w) - (r_l - a r_ref,l) - (1 - a) gamma': a weighs the reference and the home advantage.
    check_used("mixing_alpha", mixing_alpha, None, used=rc is not None or _any_nonzero(home_advantage),
               only="to weigh the reference log-probs (reference_free=False with a reference) or a nonzero "
                    "`home_advantage`")
    check_used("home_advantage", home_advantage, 0.0,
               used=mixing_alpha is None or not bool(torch.all(torch.as_tensor(mixing_alpha) == 1)),
               only="with mixing_alpha < 1 (its weight is 1 - mixing_alpha)")
    return psi.detach() if isinstance(psi, torch.Tensor) else psi


def mallows_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    neg_log_dispersion: torch.Tensor | float,
    beta: float = 10.0,
    home_advantage: float = 0.0,
    mixing_alpha: float | None = None,
    label_smoothing: float = 0.0,
    add_sft_loss: bool = False,
    sft_coef: float = 0.5,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""MallowsPO-theta: ``-(1-eps) log sigma(beta psi h) - eps log sigma(-beta psi h)``.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` policy log-probs; the official default is
            per-token MEAN log-probs (``length_normalization=True``), with ``beta = 10``.
        ref_chosen_logps, ref_rejected_logps: reference log-probs in the same normalisation, or None
            (reference-free: the official MallowsPO config, i.e. MallowsSimPO).
        neg_log_dispersion: ``psi``, ``[B]`` or a scalar (see :func:`fastpref.neg_log_dispersion`);
            detached. ``psi = 1`` gives exactly :func:`fastpref.dpo_loss` (sigmoid).
        home_advantage: ``gamma'``, a margin in log-prob units (SimPO's ``gamma / beta``).
        mixing_alpha: RainbowPO reference mixing ``a`` (None = off; the official runs use 0.25/0.5).
        label_smoothing: cDPO-style ``eps``.
        add_sft_loss, sft_coef: add ``-sft_coef * r_w`` (official defaults False / 0.5).

    Returns ``(losses, chosen_rewards, rejected_rewards)``, rewards ``beta * (r - r_ref)`` without psi.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    psi = _check_mallows(pc, pr, rc, rr, neg_log_dispersion, beta, mixing_alpha, home_advantage)
    check_label_smoothing(label_smoothing)
    _checks.flag("add_sft_loss", add_sft_loss)
    check_non_negative("sft_coef", sft_coef)
    check_used("sft_coef", sft_coef, 0.5, used=add_sft_loss, only="with add_sft_loss=True")
    h = mallows_margin(pc, pr, rc, rr, home_advantage=home_advantage, mixing_alpha=mixing_alpha)
    losses = smoothed_logistic(beta * h * psi, label_smoothing)
    if add_sft_loss:
        losses = losses - sft_coef * pc
    return (reduce(losses, reduction), *_rewards(beta, pc, pr, rc, rr))


def mallows_ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    neg_log_dispersion: torch.Tensor | float,
    beta: float = 10.0,
    home_advantage: float = 0.0,
    mixing_alpha: float | None = None,
    form: str = "mallowspo",
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""MallowsIPO, on the margin ``h`` of :func:`mallows_dpo_loss` (mean log-probs, like TRL's IPO).

    ``form``: ``"mallowspo"`` (default, MallowsPO repo) ``(psi h - 1/(2 beta))^2`` — at ``psi = 1``
    exactly TRL's IPO; ``"rainbowpo"`` ``(beta psi h - 1/2)^2`` (= beta^2 times the former);
    ``"rainbowpo_modified"`` ``relu(1/2 - beta psi h)^2``. ``beta = 10`` is the official config
    default; the RainbowPO IPO runs used 1 or 0.1.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    psi = _check_mallows(pc, pr, rc, rr, neg_log_dispersion, beta, mixing_alpha, home_advantage)
    check_choice("form", form, IPO_FORMS)
    h = mallows_margin(pc, pr, rc, rr, home_advantage=home_advantage, mixing_alpha=mixing_alpha)
    if form == "mallowspo":
        losses = (psi * h - 1 / (2 * beta)) ** 2
    elif form == "rainbowpo":
        losses = (beta * psi * h - 0.5) ** 2
    else:
        losses = torch.relu(0.5 - beta * psi * h) ** 2
    return (reduce(losses, reduction), *_rewards(beta, pc, pr, rc, rr))


def _log_f(x: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """``log f(x)`` with ``f(x) = x / (e^{psi x} - 1)``, x > 0, without overflow."""
    a = psi * x
    return torch.log(x) - a - torch.log(-torch.expm1(-a))


def _f_slope(x: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """``f'(x) = (1 - psi x e^{psi x} / (e^{psi x} - 1)) / (e^{psi x} - 1)``, overflow-free."""
    a = psi * x
    return (1 - a / -torch.expm1(-a)) / torch.expm1(a)


def _kendall_log_tail(s: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """``log(1 - g_phi(s))`` for ``s >= s0 > 0``; ``1 - g(s) = f(s) - f(s + 1)``."""
    lf, lf1 = _log_f(s, psi), _log_f(s + 1, psi)
    return lf + torch.log(-torch.expm1(lf1 - lf))


def kendall_link(s: torch.Tensor, psi: torch.Tensor | float, s0: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(log g_phi(s), log(1 - g_phi(s)))`` of the smoothed Mallows-phi (Kendall) pairwise link.

    Exact ``g_phi(s) = (s+1)/(1 - phi^{s+1}) - s/(1 - phi^s)`` (``phi = e^{-psi}``) for ``|s| >= s0``,
    with ``g(-s) = 1 - g(s)``; on ``|s| < s0`` an odd cubic ``1/2 + a s + b s^3`` matching value and
    slope at ``+-s0`` (C^1). The smoothing is fastpref's: the paper's fitted polynomial is not public.
    Computed in float64; every branch sees inputs clamped to its own domain (no NaN gradients).
    """
    s64 = s.double()
    psi64 = torch.as_tensor(psi, dtype=torch.float64, device=s.device).clamp(min=1e-8)
    # Value and slope of g at s0 fix the cubic: g = 1 - f(s) + f(s + 1), g' = f'(s + 1) - f'(s).
    edge = torch.full_like(s64, s0)
    value = -torch.expm1(_kendall_log_tail(edge, psi64))
    slope = _f_slope(edge + 1, psi64) - _f_slope(edge, psi64)
    b = (0.5 + slope * s0 - value) / (2 * s0**3)
    a = slope - 3 * b * s0**2

    far = s64.abs().clamp(min=s0)
    log_tail = _kendall_log_tail(far, psi64)  # log(1 - g(|s|))
    log_head = torch.log1p(-torch.exp(log_tail))  # log g(|s|)
    mid = s64.clamp(-s0, s0)
    cubic = 0.5 + a * mid + b * mid**3
    log_g = torch.where(s64 >= s0, log_head, torch.where(s64 <= -s0, log_tail, torch.log(cubic)))
    log_1mg = torch.where(s64 >= s0, log_tail, torch.where(s64 <= -s0, log_head, torch.log1p(-cubic)))
    return log_g.to(s.dtype), log_1mg.to(s.dtype)


def mallows_phi_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    neg_log_dispersion: torch.Tensor | float,
    beta: float = 10.0,
    link: str = "kendall",
    s0: float = 1.0,
    home_advantage: float = 0.0,
    mixing_alpha: float | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""MallowsPO-phi: ``-log g_phi(beta h)`` with ``phi(x) = exp(-psi(x))`` (no official code exists).

    ``link="kendall"`` (default): the exact Mallows-phi pairwise marginal of :func:`kendall_link`,
    smoothed by fastpref on ``|s| < s0`` (odd cubic through 1/2, C^1 at ``+-s0``; the paper's fitted
    coefficients are not public). ``link="sigmoid"``: the paper's approximation
    ``sigma(-log(phi) s) = sigma(psi s)``, which equals :func:`mallows_dpo_loss`.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    psi = _check_mallows(pc, pr, rc, rr, neg_log_dispersion, beta, mixing_alpha, home_advantage)
    check_positive("s0", s0)
    check_choice("link", link, PHI_LINKS)
    check_used("s0", s0, 1.0, used=link == "kendall", only="by link='kendall' (it smooths that link near 0)")
    h = mallows_margin(pc, pr, rc, rr, home_advantage=home_advantage, mixing_alpha=mixing_alpha)
    if link == "sigmoid":
        losses = -F.logsigmoid(beta * h * psi)
    else:
        losses = -kendall_link(beta * h, psi, s0)[0]
    return (reduce(losses, reduction), *_rewards(beta, pc, pr, rc, rr))


# ---- fused front-door adapters (see fastpref.losses.registry) ----


_MALLOWS_OPTIONS = ("length_normalization", "reference_free", "dispersion", "dispersion_c")
_MALLOWS_NEEDS = dict(reference="optional", ref_entropy=True)


def _mallows_inputs(batch: PairBatch, hparams: dict):
    """Log-probs and psi for the Mallows adapters; consumes the front-door-only hyperparameters.

    ``length_normalization`` (default True: per-token mean log-probs), ``reference_free`` (default
    True, the official config), ``dispersion`` ("mean" / "paper_sum"), ``dispersion_c`` (0.29), or a
    precomputed ``neg_log_dispersion`` (then ``dispersion`` / ``dispersion_c``, which only estimate psi,
    are refused rather than ignored).
    """
    mean = _checks.flag("length_normalization", hparams.pop("length_normalization", True))
    reference_free = hparams.pop("reference_free")  # resolved by the front door (fastpref.needs)
    psi = hparams.pop("neg_log_dispersion", None)
    if psi is not None:
        for name in ("dispersion", "dispersion_c"):
            if name in hparams:
                _checks.fail(name, "estimates psi, but `neg_log_dispersion` (psi itself) is given; pass one")
    dispersion = hparams.pop("dispersion", "mean")
    c = hparams.pop("dispersion_c", 0.29)
    check_positive("dispersion_c", c)
    if psi is None:
        chosen_h, rejected_h = batch.ref_entropy(mean=dispersion == "mean")
        psi = neg_log_dispersion(chosen_h, rejected_h, vocab_size=batch.vocab_size, c=c, dispersion=dispersion)
    pc, pr, rc, rr = batch.inputs(mean)
    if reference_free:
        rc = rr = None
    metrics = {"neg_log_dispersion": torch.as_tensor(psi, dtype=torch.float32).mean()}
    return (pc, pr, rc, rr), psi, metrics


@register("mallows_dpo", function=mallows_dpo_loss, options=_MALLOWS_OPTIONS, **_MALLOWS_NEEDS)
def _mallows_dpo_from_batch(batch: PairBatch, **hparams) -> LossResult:
    """MallowsPO-theta: DPO/SimPO margin scaled by the reference-entropy dispersion psi(x)."""
    inputs, psi, metrics = _mallows_inputs(batch, hparams)
    return LossResult(*mallows_dpo_loss(*inputs, neg_log_dispersion=psi, reduction="none", **hparams), metrics)


@register("mallows_ipo", function=mallows_ipo_loss, options=_MALLOWS_OPTIONS, **_MALLOWS_NEEDS)
def _mallows_ipo_from_batch(batch: PairBatch, **hparams) -> LossResult:
    """MallowsIPO: IPO's squared loss on the dispersion-scaled margin."""
    inputs, psi, metrics = _mallows_inputs(batch, hparams)
    return LossResult(*mallows_ipo_loss(*inputs, neg_log_dispersion=psi, reduction="none", **hparams), metrics)


@register("mallows_phi_dpo", function=mallows_phi_dpo_loss, options=_MALLOWS_OPTIONS, **_MALLOWS_NEEDS)
def _mallows_phi_from_batch(batch: PairBatch, **hparams) -> LossResult:
    """MallowsPO-phi: the Mallows-phi (Kendall) pairwise link, smoothed near 0."""
    inputs, psi, metrics = _mallows_inputs(batch, hparams)
    return LossResult(*mallows_phi_dpo_loss(*inputs, neg_log_dispersion=psi, reduction="none", **hparams), metrics)
