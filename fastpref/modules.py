"""The fused front door: hidden states + LM head -> any registered preference loss, and its nn.Module.

One path for every loss: check the hyperparameters (:meth:`LossSpec.check_hparams`), the packing
(:class:`~fastpref.segments.Segments`) and the layout's own arguments (:mod:`fastpref.layouts`),
decide what level 1 computes (:func:`fastpref.needs.resolve_needs`), run it once, reduce per
sequence, hand the layout's batch to the registered adapter, and log the layout's metrics.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import _checks
from .layouts import LAYOUT_CLASSES, Layout, make_layout, token_counts
from .losses.registry import get_loss
from .needs import resolve_needs, warn_unused
from .ops import TokenStats, token_stats
from .segments import Segments, check_token_weights

if TYPE_CHECKING:
    from .ops.vocab_parallel import VocabParallel


@dataclass
class PreferenceOutput:
    """The result of :func:`preference_loss`: unpacks as ``loss, metrics = out``.

    ``loss`` is reduced as asked; ``metrics`` are detached scalars under TRL's names. The per-row
    fields (``[S]``, one entry per sequence in the caller's row order, detached) carry what peers
    return per example: summed policy log-probs, valid token counts, the loss's implicit rewards (NaN
    on rows without one: KTO's KL rows) and which rows are "chosen" / "rejected" (pairs: the halves;
    groups: each prompt's best response / the others; unpaired: desirable / undesirable examples).
    The properties select them per side.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    logps: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    chosen_rows: torch.Tensor | None = None
    rejected_rows: torch.Tensor | None = None

    def __iter__(self):  # ``loss, metrics = out``, as when this was a (loss, metrics) NamedTuple
        return iter((self.loss, self.metrics))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index):
        return (self.loss, self.metrics)[index]

    @property
    def chosen_logps(self) -> torch.Tensor:
        """Summed log-probs of the chosen rows (pairs: ``[B]``, in pair order)."""
        return self.logps[self.chosen_rows]

    @property
    def rejected_logps(self) -> torch.Tensor:
        return self.logps[self.rejected_rows]

    @property
    def chosen_rewards(self) -> torch.Tensor:
        """Rewards of the chosen rows (pairs: ``[B]``; what ``rewards/chosen`` averages)."""
        return self.rewards[self.chosen_rows]

    @property
    def rejected_rewards(self) -> torch.Tensor:
        return self.rewards[self.rejected_rows]

    @property
    def token_counts(self) -> dict[str, torch.Tensor]:
        """Valid tokens of all scored / chosen / rejected rows: the weights of the token metrics across ranks
        (see :func:`fastpref.layouts.token_counts`)."""
        return token_counts(self.num_tokens, self.chosen_rows, self.rejected_rows)


# Registered so that DDP's output handling (and torch.export) see the tensors inside.
torch.export.register_dataclass(PreferenceOutput)


def _level1(hidden, weight, labels, segments: Segments, no_grad_from: int | None, extras: dict, **common) -> TokenStats:
    """Level 1 over all rows; sequences from ``no_grad_from`` on (KTO's KL rows) run without gradient.

    Those rows get ``ignore_index`` in the differentiable call and are the only valid rows of a second,
    ``no_grad`` call: same statistics, no backward GEMMs for rows whose loss gradient is zero.
    """
    if no_grad_from is None:
        return token_stats(hidden, weight, labels, **common, **extras)
    ignore = common["ignore_index"]
    tail = segments.sequence_index(labels.device) >= no_grad_from
    main = token_stats(hidden, weight, labels.masked_fill(tail, ignore), **common, **extras)
    with torch.no_grad():
        side = token_stats(hidden.detach(), weight.detach(), labels.masked_fill(~tail, ignore), **common)
    ref_logp = None if main.ref_logp is None else main.ref_logp + side.ref_logp
    return main._replace(logp=main.logp + side.logp, ref_logp=ref_logp)


def _nll_from_labels(hidden, weight, labels, nll_labels, segments: Segments, layout: Layout, **common) -> torch.Tensor:
    """The NLL term on its own target: token-mean ``-log p(nll_labels)`` over the chosen rows (one more fused pass).

    Only the chosen rows of ``nll_labels`` are read (as TRL and Liger take the NLL target of the chosen half).
    """
    _checks.tensor("nll_labels", nll_labels, floating=False)
    if nll_labels.shape != labels.shape:
        _checks.fail("nll_labels", f"has shape {tuple(nll_labels.shape)}; expected the shape of labels "
                                   f"{tuple(labels.shape)}")
    _checks.same_device("nll_labels", nll_labels, "labels", labels)
    chosen = layout.chosen_rows[segments.sequence_index(labels.device)]
    target = nll_labels.masked_fill(~chosen, common["ignore_index"])
    count = int((target != common["ignore_index"]).sum())
    if count == 0:
        _checks.fail("nll_labels", "has no valid (non-ignore_index) token in the chosen rows")
    return -token_stats(hidden, weight, target, **common).logp.sum() / count


def preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "dpo",
    bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_chosen_entropy: torch.Tensor | None = None,
    ref_rejected_entropy: torch.Tensor | None = None,
    group_sizes: torch.Tensor | list[int] | None = None,
    scores: torch.Tensor | None = None,
    desirable: torch.Tensor | None = None,
    num_kl_rows: int | None = None,
    nll_labels: torch.Tensor | None = None,
    logp_weights: torch.Tensor | None = None,
    kl_weights: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    trl_metrics: bool = False,
    logits_budget: int = 0,
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
    vocab_parallel: VocabParallel | None = None,
    **hparams,
) -> PreferenceOutput:
    r"""Any registered preference loss, fused from the LM head: hidden states in, loss and metrics out.

    How the sequences (rows, or packed sequences) form examples depends on the loss's layout
    (:func:`fastpref.get_loss` ``(name).layout``; :mod:`fastpref.layouts`):

    * ``"pairs"`` (DPO family, SimPO, MallowsPO, TDPO, ...): ``[chosen_1..chosen_B ; rejected_1..rejected_B]``.
    * ``"groups"`` (PRO, MPPO, LiPO, DPO-Plackett-Luce): each prompt's K responses contiguously,
      ``group_sizes [B]`` (K >= 2, may vary); best first, or ``scores [S]`` (higher is better).
    * ``"unpaired"`` (KTO): ``[examples ; KL rows]`` with ``desirable [n]`` and ``num_kl_rows``
      mismatched (prompt, completion) rows for KTO's reference point (run without gradient).

    Only what the loss needs is computed (:func:`fastpref.needs.resolve_needs`): log-probs always, the
    reference head only when the loss uses it, reference entropies only for MallowsPO (and not when
    ``neg_log_dispersion`` is given), the per-token KL only for TDPO. Reference inputs the loss will
    not use get a warning (e.g. reference log-probs with MallowsPO's reference-free default).

    Args:
        hidden: ``[S, T, d]`` (padded) or ``[1, N, d]`` with ``cu_seqlens``/``seq_ids`` (packed),
            aligned with ``labels`` (see :func:`fastpref.shift_labels`).
        weight, bias: the LM head. labels: targets, ``ignore_index`` on prompt and padding.
        loss: registry name (:func:`fastpref.available_losses`).
        ref_logps: precomputed ``[S]`` SUMMED reference log-probs, one per sequence (any layout);
            for pairs, ``ref_chosen_logps`` / ``ref_rejected_logps`` (``[B]`` each) are the same.
            They take precedence over the reference head and are detached (a reference gets no gradient).
            Compute them with the same ``logit_scale`` / ``softcap`` / ``temperature`` (the reference head
            gets those).
        ref_hidden, ref_weight, ref_bias: a frozen reference head run in the same fused pass
            (``ref_weight`` defaults to ``weight``, and then ``ref_bias`` to ``bias``). Required by TDPO
            (per-token KL).
        ref_chosen_entropy, ref_rejected_entropy: precomputed ``[B]`` SUMMED reference token
            entropies for MallowsPO's dispersion. Without them MallowsPO uses the reference head, or,
            when there is none, the policy's own entropy without gradient (a stand-in for the
            initial model early in training).
        group_sizes, scores: list layout (see above); ``scores`` per sequence ``[S]``.
        desirable, num_kl_rows: unpaired layout (see above; :mod:`fastpref.losses.unpaired`).
        nll_labels: a separate target for the NLL term of CPO / ORPO / SimPO (``sft_weight > 0``),
            shaped like ``labels`` (e.g. with the prompt tokens kept); only its chosen rows are read.
            Costs one more fused pass over those tokens. Without it the NLL is on ``labels``. Switch
            the term off with ``cpo_alpha=0`` (CPO), ``nll_weight=0`` (ORPO), ``sft_weight=0`` (SimPO).
        logp_weights, kl_weights: per-token weights shaped like ``labels`` (may require grad) on the
            log-ratio and KL sums, for losses that accept them (TDPO; TDPO1 + weights = SparsePO).
            Weighted log-ratios need the reference head, not precomputed reference log-probs.
        reduction: ``"mean"`` over examples (pairs / prompts / unpaired examples), ``"sum"`` or ``"none"``.
        trl_metrics: also log ``entropy``, ``logits/chosen``, ``logits/rejected`` and
            ``mean_token_accuracy`` as TRL does (costs a little in the row pass).
        logits_budget, chunk_size, logit_scale, softcap, temperature, backend: see
            :func:`fastpref.token_stats`.
        vocab_parallel: a :class:`fastpref.ops.vocab_parallel.VocabParallel` when ``weight`` is this
            rank's shard of a vocabulary-parallel head (passed to :func:`fastpref.token_stats`; its
            full ``vocab_size`` is MallowsPO's ``V``).
        **hparams: the loss's keyword arguments (``beta``, ``loss_type``, ``alpha``, ...), as in the
            functional loss; an unknown name is a ``ValueError`` listing the accepted ones.
            ``use_weighting=True`` applies WPO's weights to a pairwise loss.

    Returns:
        :class:`PreferenceOutput`: ``loss, metrics = out``; metrics use TRL's names (``rewards/chosen``,
        ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
        ``logps/rejected``, plus loss-specific ones such as ``nll_loss``, ``kl/chosen``, ``kl``,
        ``rank_1_loss``). For lists the best response is "chosen" and the others "rejected". Per-row
        values: ``out.logps``, ``out.rewards`` (``[S]``), ``out.chosen_rewards``, ``out.rejected_logps``, ...
    """
    spec = get_loss(loss)
    spec.check_hparams(hparams)
    spec.check_reduction(hparams, reduction)
    _checks.flag("trl_metrics", trl_metrics)
    _checks.tensor("labels", labels, floating=False)
    segments = Segments(labels, cu_seqlens, seq_ids, ignore_index=ignore_index)
    layout = make_layout(spec.layout, spec.name, segments.num, labels, dict(
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, ref_logps=ref_logps,
        ref_chosen_entropy=ref_chosen_entropy, ref_rejected_entropy=ref_rejected_entropy,
        group_sizes=group_sizes, scores=scores, desirable=desirable, num_kl_rows=num_kl_rows,
    ))
    use_weighting = spec.use_weighting(hparams)
    hparams.pop("use_weighting", None)
    if (logp_weights is not None or kl_weights is not None) and not spec.token_weights:
        _checks.fail("logp_weights" if logp_weights is not None else "kl_weights",
                     f"(per-token weights) are not used by loss {spec.name!r}")
    check_token_weights(labels, logp_weights, kl_weights, kl=spec.kl, ignore_index=ignore_index)
    _checks.reference_head_parts(ref_hidden, ref_weight, ref_bias)
    needs = resolve_needs(spec, hparams, ref_logps=layout.ref_logps is not None,
                          ref_entropy=layout.ref_entropy is not None, ref_head=ref_hidden is not None,
                          nll_labels=nll_labels is not None)
    if logp_weights is not None and needs.ref_logps == "precomputed":
        _checks.fail("logp_weights", "weight the reference log-probs per token: use the reference head "
                                     "(`ref_hidden`), not precomputed reference log-probs")
    given_as = "`ref_chosen_logps`/`ref_rejected_logps`" if ref_chosen_logps is not None else "`ref_logps`"
    warn_unused(spec, needs, {"ref_logps": given_as, "ref_head": "`ref_hidden`",
                              "ref_entropy": "`ref_chosen_entropy`/`ref_rejected_entropy`"})
    if needs.reference_free is not None:
        hparams["reference_free"] = needs.reference_free

    run_head = needs.run_ref_head
    common = dict(bias=bias, ignore_index=ignore_index, logits_budget=logits_budget, chunk_size=chunk_size,
                  logit_scale=logit_scale, softcap=softcap, temperature=temperature, backend=backend,
                  vocab_parallel=vocab_parallel)
    stats = _level1(
        hidden, weight, labels, segments, layout.no_grad_from,
        dict(kl=needs.kl, ref_entropy=needs.ref_entropy == "head", entropy=trl_metrics or needs.policy_entropy,
             detach_entropy=trl_metrics or needs.policy_entropy, log_sum_sq_probs=use_weighting,
             mean_logits=trl_metrics, is_top1=trl_metrics),
        ref_hidden=ref_hidden if run_head else None,
        ref_weight=ref_weight if run_head else None,
        ref_bias=ref_bias if run_head else None,
        **common,
    )
    seq = segments.reduce(stats, logp_weights, kl_weights)
    ref_seq = {"precomputed": layout.ref_logps, "head": seq.ref_sum_logp, None: None}[needs.ref_logps]
    entropy = {"precomputed": layout.ref_entropy, "head": seq.ref_sum_entropy, "policy": seq.sum_entropy,
               None: None}[needs.ref_entropy]
    nll = None if nll_labels is None else _nll_from_labels(hidden, weight, labels, nll_labels, segments, layout,
                                                            **common)
    vocab = vocab_parallel.vocab_size if vocab_parallel is not None else weight.shape[0]
    batch = layout.batch(seq, ref_logps=ref_seq, ref_entropy=None if entropy is None else entropy.detach(),
                         vocab_size=vocab, nll_loss=nll)
    result = spec.compute(batch, **hparams)
    losses = result.losses * layout.wpo(seq) if use_weighting else result.losses

    metrics = layout.metrics(result, batch)
    metrics.update({k: v.detach() for k, v in result.metrics.items()})
    if trl_metrics:
        metrics.update(layout.token_metrics(stats, segments))
    return PreferenceOutput(
        _checks.reduce(losses, reduction), metrics, logps=seq.sum_logp.detach(), num_tokens=segments.num_tokens,
        rewards=layout.row_rewards(result), chosen_rows=layout.chosen_rows, rejected_rows=layout.rejected_rows,
    )


_CHECKED: set = set()  # (loss, hyperparameters) that check_values has run


def check_values(loss: str, hparams: Mapping) -> None:
    """Runs ``loss`` once on its layout's smallest synthetic batches (no gradient, the PyTorch rows), so that a
    bad VALUE of a hyperparameter in ``hparams`` (``beta=-5``, ``loss_type="bco"``) is a ``ValueError`` when a
    loss or trainer is built rather than at its first step, after a reference precompute.

    Only errors naming given hyperparameters alone are raised here; one that names anything else (a per-batch
    input such as the ``todo`` loss's ``ties`` that the synthetic batch lacks) is left to the real batch. A tensor setting
    is tried with one of its values (its shape is checked per batch); the global RNG is left as it was.
    """
    spec = get_loss(loss)
    # a tensor setting by one of its values (a [B] one fits no synthetic batch); a user's generator is not drawn from
    given = {k: v.detach().reshape(-1)[0].cpu() if isinstance(v, torch.Tensor) else v for k, v in hparams.items()
             if not isinstance(v, torch.Generator) and not (isinstance(v, torch.Tensor) and v.numel() == 0)}
    key = (loss, repr(sorted(given.items(), key=lambda kv: kv[0])))
    if key in _CHECKED:  # the integrations build the same loss at every step
        return
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 4, generator=g)
    for num, inputs in LAYOUT_CLASSES[spec.layout].examples():
        hidden = torch.randn(num, 2, 4, generator=g)
        labels = torch.randint(0, 8, (num, 2), generator=g)
        labels[:, 0] = -100  # one token per sequence: summed statistics stay in the ranges of means
        try:
            with torch.no_grad(), warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                warnings.simplefilter("ignore")  # unused-input warnings of the synthetic reference head
                preference_loss(hidden, weight, labels, loss=loss, ref_hidden=hidden + 0.1, backend="torch",
                                **inputs, **given)
            break
        except (ValueError, TypeError) as err:
            # about given values only: a message that also names another input (say MMPO's `bt_beta` without
            # the per-batch `chosen_scores`) may be about what the synthetic batch lacks
            named = re.findall(r"`([^`]+)`", str(err))
            if isinstance(err, ValueError) and named and all(name in given for name in named):
                raise
    _CHECKED.add(key)


# preference_loss's own keyword arguments; every other keyword is a hyperparameter of the loss.
FRONT_DOOR_ARGUMENTS = frozenset(
    name for name, p in inspect.signature(preference_loss).parameters.items() if p.kind is p.KEYWORD_ONLY
)


class PreferenceLoss(torch.nn.Module):
    """Module form of :func:`preference_loss`: ``PreferenceLoss("mallows_dpo", beta=10.0)``.

    ``forward(hidden, weight, labels, **kwargs)`` merges ``kwargs`` over the constructor's keyword
    arguments (per-batch tensors such as ``ref_chosen_logps``, ``group_sizes``, ``scores``,
    ``desirable`` go to ``forward``). The loss's hyperparameters are checked at construction: an
    unknown (e.g. misspelt) name is a ``ValueError`` listing the accepted ones.

    Example::

        criterion = fastpref.PreferenceLoss("simpo", beta=2.0, gamma_beta_ratio=0.5)
        out = criterion(hidden, model.lm_head.weight, labels)     # rows [chosen; rejected]
        out.loss.backward(); out.metrics["rewards/margins"]

        criterion = fastpref.PreferenceLoss("mppo_pair_mnm")       # 4 scored responses per prompt
        out = criterion(hidden, model.lm_head.weight, labels, group_sizes=[4] * B, scores=scores)
    """

    def __init__(self, loss: str = "dpo", **options):
        super().__init__()
        spec = get_loss(loss)
        hparams = {k: v for k, v in options.items() if k not in FRONT_DOOR_ARGUMENTS}
        spec.check_hparams(hparams)
        spec.check_reduction(options, options.get("reduction", "mean"))
        check_values(loss, hparams)
        self.loss = loss
        self.options = options

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **kwargs) -> PreferenceOutput:
        return preference_loss(hidden, weight, labels, loss=self.loss, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join([repr(self.loss)] + [f"{k}={v!r}" for k, v in self.options.items()])
