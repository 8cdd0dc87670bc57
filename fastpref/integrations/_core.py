"""What the trainer integrations share: a loss by name, labels from masks, the fused call, the reference.

Everything here is plain torch + fastpref; the models are anything :func:`fastpref.integrations._head.install`
patched (Hugging Face ``PreTrainedModel``s).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .. import _checks
from ..losses.registry import get_loss
from ..modules import PreferenceOutput, preference_loss
from ..ops import shift_labels
from ..segments import sequence_logps

# Per-batch inputs of preference_loss, by layout (what a collator may put in a batch next to the tokens).
LOSS_INPUTS = (
    "ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_chosen_entropy", "ref_rejected_entropy",
    "group_sizes", "scores", "desirable", "num_kl_rows", "logp_weights", "kl_weights",
)
# Batch keys that are neither model inputs nor loss inputs.
NON_MODEL_KEYS = ("labels", "completion_mask") + LOSS_INPUTS
# Token metrics whose cross-rank average must be weighted by token counts, and by which rows.
TOKEN_WEIGHTED = {
    "entropy": "all", "logits/chosen": "chosen", "logits/rejected": "rejected", "mean_token_accuracy": "chosen",
}


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
    ``chunk_size`` / ``logits_budget`` / ``backend`` to :func:`fastpref.token_stats`.
    """

    loss: str = "dpo"
    hparams: dict = field(default_factory=dict)
    chunk_size: int | None = None
    logits_budget: int = 0
    backend: str | None = None

    def __post_init__(self):
        self.spec = get_loss(self.loss)
        self.hparams = dict(self.hparams or {})

    @property
    def layout(self) -> str:
        return self.spec.layout

    @property
    def uses_reference(self) -> bool:
        """Whether the loss uses reference log-probs (with its ``reference_free`` default resolved)."""
        hparams = dict(self.hparams)
        if self.spec.reference == "optional":
            hparams.setdefault("reference_free", self.spec.reference_free_default)
        return self.spec.uses_reference(hparams)

    @property
    def wants_ref_entropy(self) -> bool:
        """MallowsPO's dispersion needs reference entropies unless ``neg_log_dispersion`` is fixed."""
        return self.spec.ref_entropy and "neg_log_dispersion" not in self.hparams

    def needs_ref_head(self, batch: dict) -> bool:
        """Whether this batch needs a reference forward (what precomputed columns do not already give)."""
        has_logps = "ref_chosen_logps" in batch or "ref_logps" in batch
        has_entropy = "ref_chosen_entropy" in batch
        return (self.uses_reference and not has_logps) or self.spec.kl or (self.wants_ref_entropy and not has_entropy)

    def closure(self, labels: torch.Tensor, transform: dict, *, ref_hidden=None, ref_weight=None, ref_bias=None,
                trl_metrics: bool = True, **loss_inputs):
        """``fn(hidden, weight, bias) -> PreferenceOutput``, to run inside the model's forward."""

        def fn(hidden, weight, bias):
            hidden, weight, bias = _compute_dtype(hidden[:, -labels.shape[1]:], weight, bias)
            rh, rw, rb = ref_hidden, ref_weight, ref_bias
            if rh is not None:
                rh = rh[:, -labels.shape[1]:].to(hidden.dtype)
                rw = None if rw is None else rw.to(hidden.dtype)
                rb = None if rb is None else rb.to(hidden.dtype)
            with torch.autocast(hidden.device.type, enabled=False):
                return preference_loss(
                    hidden, weight, labels, loss=self.loss, bias=bias, ref_hidden=rh, ref_weight=rw, ref_bias=rb,
                    trl_metrics=trl_metrics, chunk_size=self.chunk_size, logits_budget=self.logits_budget,
                    backend=self.backend, **transform, **loss_inputs, **self.hparams,
                )

        return fn


def _compute_dtype(hidden, weight, bias):
    """The fused op's operands in one dtype: autocast's when it is on (as ``F.linear`` would run the
    head, and TRL's fused head does), else the head's (fp32 hidden states meet a bf16 head in bf16).

    Prompt-learning PEFT prepends virtual tokens, which the caller drops by keeping the last T positions.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def split_batch(inputs: dict) -> tuple[dict, dict]:
    """``(model_kwargs, loss_inputs)`` of a collated batch; tensors stay where the trainer put them."""
    model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
    loss_inputs = {k: inputs[k] for k in LOSS_INPUTS if inputs.get(k) is not None}
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
        with torch.autocast(hidden.device.type, enabled=False):
            seq = sequence_logps(hidden, weight, labels, bias=bias, entropy=entropy, detach_entropy=True,
                                 chunk_size=chunk_size, backend=backend, **transform)
        out = {"logps": seq.sum_logp}
        if entropy:
            out["entropy"], out["num_tokens"] = seq.sum_entropy, seq.num_tokens
        return out

    with torch.no_grad(), (adapter_context or contextlib.nullcontext()):
        return model(**model_kwargs, fastpref_fn=fn, fastpref_grad=False)


def token_counts(labels: torch.Tensor, layout: str) -> dict[str, torch.Tensor]:
    """Valid tokens of all / chosen / rejected rows, the weights of :data:`TOKEN_WEIGHTED` metrics (pairs)."""
    valid = (labels != -100).sum(-1)
    half = valid.shape[0] // 2
    if layout != "pairs":
        return {"all": valid.sum()}
    return {"all": valid.sum(), "chosen": valid[:half].sum(), "rejected": valid[half:].sum()}


def gather_metrics(metrics: dict, counts: dict, gather) -> dict[str, float]:
    """Cross-rank metric values as TRL computes them: token metrics weighted by tokens, the rest averaged.

    ``gather`` is ``accelerator.gather`` (identity on one process).
    """
    out = {}
    for name, value in metrics.items():
        value = value.detach().float().reshape(())
        rows = TOKEN_WEIGHTED.get(name)
        if rows is not None and rows in counts:
            weight = counts[rows].float().reshape(())
            total = gather(weight.reshape(1)).sum()
            out[name] = (gather((value * weight).reshape(1)).sum() / total).item() if total > 0 else 0.0
        else:
            out[name] = gather(value.reshape(1)).mean().item()
    return out


__all__ = ["FusedLoss", "PreferenceOutput", "completion_labels", "gather_metrics", "reference_head",
           "sequence_reference_stats", "split_batch", "token_counts"]
