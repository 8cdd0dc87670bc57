"""What the trainer integrations share: a loss by name, labels from masks, the fused call, the reference.

Everything here is plain torch + fastpref; the models are anything :func:`fastpref.integrations._head.install`
patched (Hugging Face ``PreTrainedModel``s).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .. import _checks
from ..layouts import LAYOUT_CLASSES, TOKEN_METRIC_ROWS, make_layout, token_counts
from ..losses.registry import get_loss
from ..modules import PreferenceOutput, check_values, preference_loss
from ..needs import Needs, resolve_needs
from ..ops import backends, shift_labels
from ..segments import Segments, sequence_logps

# Per-batch inputs of preference_loss, by layout (what a collator may put in a batch next to the tokens).
LOSS_INPUTS = (
    "ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_chosen_entropy", "ref_rejected_entropy",
    "group_sizes", "scores", "desirable", "num_kl_rows", "logp_weights", "kl_weights",
)
# Batch keys that are neither model inputs nor loss inputs.
NON_MODEL_KEYS = ("labels", "completion_mask") + LOSS_INPUTS
# Per-example means of unpaired batches, averaged over ranks by the examples of their rows (each rank
# has its own number of desirable / undesirable examples); the token metrics are weighted by tokens.
EXAMPLE_WEIGHTED = {
    "rewards/chosen": "chosen", "logps/chosen": "chosen", "rewards/rejected": "rejected", "logps/rejected": "rejected",
}
# The level-1 options every integration takes (see fastpref.token_stats).
OPTIONS = ("chunk_size", "logits_budget", "backend")


def check_options(chunk_size=None, logits_budget=0, backend=None, *, prefix: str = "") -> None:
    """Refuse level-1 options :func:`fastpref.token_stats` would reject at the first step (``prefix``: how
    the caller spells them, e.g. ``"fastpref_"`` for the trainer configs)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        _checks.fail(f"{prefix}chunk_size", f"must be None (automatic) or a positive int, got {chunk_size!r}")
    if isinstance(logits_budget, bool) or not isinstance(logits_budget, int) or logits_budget < 0:
        _checks.fail(f"{prefix}logits_budget", f"must be a non-negative int (bytes), got {logits_budget!r}")
    names = sorted(backends())
    if backend is not None and backend not in names:
        _checks.fail(f"{prefix}backend", f"must be None (by device) or one of {names}, got {backend!r}")


def completion_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
    """Labels aligned with the UNSHIFTED hidden states: ``shift_labels(input_ids masked to -100 off-completion)``.

    Give ``completion_mask`` (TRL's collators: 1 on completion tokens) or HF-style ``labels``
    (``-100`` on prompt and padding, not yet shifted).
    """
    if labels is None:
        if completion_mask is None:
            _checks.fail("labels", "or `completion_mask` is required to know which tokens are scored")
        labels = input_ids.masked_fill(completion_mask == 0, -100)
    return shift_labels(labels)


@dataclass
class FusedLoss:
    """A fastpref loss by name with its hyperparameters and the level-1 options of every call.

    ``hparams`` go to the loss (``beta``, ``loss_type``, ``gamma_beta_ratio``, ``use_weighting``, ...);
    ``chunk_size`` / ``logits_budget`` / ``backend`` to :func:`fastpref.token_stats`. All are checked
    here (names, and values by :func:`fastpref.modules.check_values`), so a typo or a value out of range
    fails when the trainer is built rather than at its first step.
    """

    loss: str = "dpo"
    hparams: dict = field(default_factory=dict)
    chunk_size: int | None = None
    logits_budget: int = 0
    backend: str | None = None

    def __post_init__(self):
        self.spec = get_loss(self.loss)
        if self.hparams is not None and not isinstance(self.hparams, dict):
            _checks.fail("hparams", f"must be a dict of loss hyperparameters, got {type(self.hparams).__name__}")
        self.hparams = dict(self.hparams or {})
        self.spec.check_hparams(self.hparams)
        check_values(self.loss, self.hparams)
        check_options(self.chunk_size, self.logits_budget, self.backend)

    @property
    def layout(self) -> str:
        return self.spec.layout

    def needs(self, loss_inputs: dict, *, ref_head: bool = True) -> Needs:
        """What this loss needs on a batch with ``loss_inputs`` (:func:`fastpref.needs.resolve_needs`).

        ``loss_inputs``: the batch's loss inputs (precomputed reference columns, per-batch
        hyperparameters such as a per-pair ``neg_log_dispersion``; only their presence matters).
        ``ref_head``: whether a reference forward is possible. Its ``run_ref_head`` says whether the
        batch needs one (what precomputed columns do not already give); ``ref_logps`` /
        ``ref_entropy`` (with nothing precomputed) say what a precompute must store.
        """
        per_batch = {k: v for k, v in loss_inputs.items() if k in self.spec.hyperparameters}
        return resolve_needs(
            self.spec, {**self.hparams, **per_batch},
            ref_logps="ref_chosen_logps" in loss_inputs or "ref_logps" in loss_inputs,
            ref_entropy="ref_chosen_entropy" in loss_inputs, ref_head=ref_head,
        )

    def closure(self, labels: torch.Tensor, transform: dict, *, ref_hidden=None, ref_weight=None, ref_bias=None,
                trl_metrics: bool = True, **loss_inputs):
        """``fn(hidden, weight, bias) -> PreferenceOutput``, to run inside the model's forward."""

        both = sorted(set(loss_inputs) & set(self.hparams))
        if both:
            _checks.fail(both[0], "is given both per batch and as a loss hyperparameter; pass it once")

        def fn(hidden, weight, bias):
            hidden, weight, bias = _compute_dtype(hidden[:, -labels.shape[1]:], weight, bias)
            rh, rw, rb = ref_hidden, ref_weight, ref_bias
            if rh is not None:
                rh = rh[:, -labels.shape[1]:].to(hidden.dtype)
                rw = None if rw is None else rw.to(hidden.dtype)
                rb = None if rb is None else rb.to(hidden.dtype)
            return preference_loss(
                hidden, weight, labels, loss=self.loss, bias=bias, ref_hidden=rh, ref_weight=rw, ref_bias=rb,
                trl_metrics=trl_metrics, chunk_size=self.chunk_size, logits_budget=self.logits_budget,
                backend=self.backend, **transform, **loss_inputs, **self.hparams,
            )

        return fn


def _compute_dtype(hidden, weight, bias):
    """The hidden states in the head's dtype (fp32 hidden states meet a bf16 head in bf16); under
    autocast, ``token_stats`` itself runs the head in autocast's dtype, as ``F.linear`` would.

    Prompt-learning PEFT prepends virtual tokens, which the caller drops by keeping the last T positions.
    """
    return hidden.to(weight.dtype), weight, bias


def split_batch(inputs: dict, plan: FusedLoss | None = None) -> tuple[dict, dict]:
    """``(model_kwargs, loss_inputs)`` of a collated batch; tensors stay where the trainer put them.

    Loss inputs are the front door's per-batch arguments (:data:`LOSS_INPUTS`) and, given the
    ``plan``, the loss's hyperparameters found in the batch (MMPO's ``soft_labels``, TODO's ``ties``);
    every other key except ``labels`` / ``completion_mask`` goes to the model.
    """
    loss_keys = set(LOSS_INPUTS) | set(plan.spec.hyperparameters if plan is not None else ())
    model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS and k not in loss_keys}
    loss_inputs = {k: v for k, v in inputs.items() if k in loss_keys and v is not None}
    if "group_sizes" in loss_inputs and isinstance(loss_inputs["group_sizes"], torch.Tensor):
        loss_inputs["group_sizes"] = loss_inputs["group_sizes"].long()
    if "desirable" in loss_inputs:
        loss_inputs["desirable"] = loss_inputs["desirable"].bool()
    if "num_kl_rows" in loss_inputs and isinstance(loss_inputs["num_kl_rows"], torch.Tensor):
        loss_inputs["num_kl_rows"] = int(loss_inputs["num_kl_rows"].reshape(-1)[0])
    return model_kwargs, loss_inputs


def reference_head(ref_model, model_kwargs: dict, *, copy: bool = False, adapter_context=None):
    """``(ref_hidden, ref_weight, ref_bias)`` from a reference forward without gradient.

    ``ref_model`` is a patched reference model (or the policy, with ``adapter_context`` disabling its
    PEFT adapters; then the head is the policy's and ``ref_weight`` is None). ``copy`` keeps the head
    alive after the forward of a sharded model (FSDP / ZeRO-3).
    """
    policy_head = adapter_context is not None

    def grab(hidden, weight, bias):
        return (hidden, None, None) if policy_head else (hidden, weight, bias)

    with torch.no_grad(), (adapter_context or contextlib.nullcontext()):
        return ref_model(**model_kwargs, fastpref_fn=grab, fastpref_grad=False, fastpref_copy=copy)


def sequence_reference_stats(model, model_kwargs: dict, labels: torch.Tensor, transform: dict, *, entropy: bool,
                             chunk_size=None, backend=None, adapter_context=None) -> dict[str, torch.Tensor]:
    """Per-sequence SUMMED log-probs (and token entropies) of ``model`` on a batch, without gradient.

    What ``precompute_ref_log_probs`` stores: ``{"logps": [S], "entropy": [S] or absent}``, and the
    scored tokens per sequence (``"num_tokens"``, after the collator's truncation) with the entropies.
    """

    def fn(hidden, weight, bias):
        hidden, weight, bias = _compute_dtype(hidden[:, -labels.shape[1]:], weight, bias)
        seq = sequence_logps(hidden, weight, labels, bias=bias, entropy=entropy, detach_entropy=entropy,
                             chunk_size=chunk_size, backend=backend, **transform)
        out = {"logps": seq.sum_logp}
        if entropy:
            out["entropy"], out["num_tokens"] = seq.sum_entropy, seq.num_tokens
        return out

    with torch.no_grad(), (adapter_context or contextlib.nullcontext()):
        return model(**model_kwargs, fastpref_fn=fn, fastpref_grad=False)


def metric_weights(plan: FusedLoss, labels: torch.Tensor, loss_inputs: dict, *, ignore_index: int = -100,
                   examples: bool = False) -> dict[str, torch.Tensor]:
    """This rank's weights of the weighted metrics for :func:`gather_metrics`.

    The token metrics (:data:`fastpref.layouts.TOKEN_METRIC_ROWS`) by the scored tokens of their rows
    (the loss's layout says which rows are chosen / rejected: the pair halves, each prompt's best
    response, the desirable examples); with ``examples`` also the per-example means of unpaired
    batches (:data:`EXAMPLE_WEIGHTED`) by their examples. ``labels`` and ``loss_inputs`` as given to
    :func:`fastpref.preference_loss`.
    """
    segments = Segments(labels, ignore_index=ignore_index)
    arguments = {k: loss_inputs[k] for k in LAYOUT_CLASSES[plan.layout].arguments if k in loss_inputs}
    layout = make_layout(plan.layout, plan.loss, segments.num, labels, arguments)
    rows = {"chosen": layout.chosen_rows, "rejected": layout.rejected_rows}
    counts = token_counts(segments.num_tokens, rows["chosen"], rows["rejected"])
    weights = {name: counts[which] for name, which in TOKEN_METRIC_ROWS.items()}
    if examples:
        weights.update({name: rows[which].sum() for name, which in EXAMPLE_WEIGHTED.items()})
    return weights


def gather_metrics(metrics: dict, weights: dict, gather, *, empty: float | None = 0.0) -> dict[str, float]:
    """Cross-rank metric values as TRL computes them, in one collective.

    A metric with an entry in ``weights`` is averaged with those weights (token counts: sum of
    value x tokens over ranks / sum of tokens), the others are the mean over ranks. A weighted metric
    no rank has weight for is ``empty`` (TRL's DPOTrainer logs 0.0), or left out when ``empty`` is None
    (its KTOTrainer). A metric a rank lacks (KTO's chosen means on a rank without desirable examples, PRO's
    ``rank_k_loss`` of a stage only another rank's lists have) counts there as 0 with weight 0; with
    several processes the ranks first agree on the names (one small object gather).
    ``gather`` is ``accelerator.gather`` (identity on one process).
    """
    names = sorted({*metrics, *weights})  # one order on every rank, whichever metrics each one has
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, names)
        names = sorted(set().union(*every))
    if not names:
        return {}
    tensors = [*metrics.values(), *weights.values()]
    device = tensors[0].device if tensors else torch.device("cpu")  # a rank that logged nothing this step
    one = torch.ones((), device=device)
    values = torch.stack([metrics[n].detach().float().reshape(()) if n in metrics else 0 * one for n in names])
    counts = torch.stack([weights[n].detach().float().reshape(()) if n in weights else one if n in metrics
                          else 0 * one for n in names])
    weighted = torch.where(counts > 0, values * counts, 0 * one)  # a rank without weight adds nothing, not NaN
    totals = gather(torch.cat([weighted, counts])[None]).sum(0).tolist()
    out = {}
    for i, name in enumerate(names):
        weighted_sum, total = totals[i], totals[len(names) + i]
        if total > 0:
            out[name] = weighted_sum / total
        elif empty is not None:
            out[name] = empty
    return out


__all__ = ["FusedLoss", "PreferenceOutput", "check_options", "completion_labels", "gather_metrics", "metric_weights",
           "reference_head", "sequence_reference_stats", "split_batch"]
