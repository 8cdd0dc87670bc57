"""Input validation shared by every level: clear ``ValueError``s that name the offending argument."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DTYPES = FLOAT_DTYPES + (torch.float64,)  # level 1 also takes fp64 (tests, research code)


def fail(arg: str, message: str) -> None:
    raise ValueError(f"fastpref: `{arg}` {message}")


def tensor(arg: str, x, *, ndim: int | None = None, min_ndim: int | None = None, floating: bool | None = None,
           dtypes: tuple = FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        fail(arg, f"must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        fail(arg, f"must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        fail(arg, f"must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    if floating is True and x.dtype not in dtypes:
        fail(arg, f"must be one of {', '.join(str(d).replace('torch.', '') for d in dtypes)}, got {x.dtype}")
    if floating is False and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        fail(arg, f"must be an integer tensor, got {x.dtype}")


def labels_with(labels: torch.Tensor, ignore_index) -> None:
    """Integer ``labels`` whose dtype can hold ``ignore_index`` (in uint8, -100 would compare as 156)."""
    tensor("labels", labels, floating=False)
    integer("ignore_index", ignore_index)
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        fail("labels", f"are {labels.dtype}, which cannot hold ignore_index={ignore_index}; use torch.long labels")


def same_device(arg: str, x: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        fail(arg, f"is on {x.device} but `{ref_arg}` is on {ref.device}")


def same_dtype(arg: str, x: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        fail(arg, f"has dtype {x.dtype} but `{ref_arg}` has {ref.dtype}")


def flag(arg: str, value) -> bool:
    """A boolean option: ``True``/``False`` (or 0/1), never a string or other truthy object."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    fail(arg, f"must be True or False, got {value!r}")


def integer(arg: str, value, *, minimum: int | None = None, optional: bool = False) -> None:
    """An int option (not a bool), at least ``minimum``; None allowed when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        fail(arg, f"must be an int{bound}{' or None' if optional else ''}, got {value!r}")


def positive(arg: str, value, *, optional: bool = False) -> None:
    """A finite real number > 0 (not a bool or a string); None allowed when ``optional``."""
    if value is None and optional:
        return
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) a float may be symbolic (NaN fails both)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        fail(arg, f"must be a finite number > 0{' or None' if optional else ''}, got {value!r}")


def _head(prefix: str, hidden, weight, bias, labels) -> None:
    """Checks one (hidden, weight, bias) head against ``labels``; ``prefix`` is "" or "ref_"."""
    h, w, b = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    tensor(h, hidden, min_ndim=1, floating=True, dtypes=HEAD_DTYPES)
    tensor(w, weight, floating=True, dtypes=HEAD_DTYPES)
    if weight.numel() == 0 and hasattr(weight, "ds_id"):
        fail(w, "is a DeepSpeed ZeRO-3 partitioned parameter (empty outside its module's forward): gather it "
                "with deepspeed.zero.GatheredParameters, or let fastpref.integrations call the loss inside the "
                "model's forward, where the head is gathered")
    if weight.dim() != 2:
        fail(w, f"must have 2 dimensions [V, d], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        fail(w, f"has no vocabulary rows (shape {tuple(weight.shape)}); a sharded head must be gathered first")
    if hidden.shape[:-1] != labels.shape:
        fail(h, f"has shape {tuple(hidden.shape)}; expected labels.shape + (d,) = {tuple(labels.shape)} + (d,)")
    if weight.shape[1] != hidden.shape[-1]:
        fail(w, f"has shape {tuple(weight.shape)}; expected (V, {hidden.shape[-1]}) to match `{h}`")
    same_dtype(w, weight, h, hidden)
    same_device(h, hidden, "labels", labels)
    same_device(w, weight, "labels", labels)
    if bias is not None:
        tensor(b, bias, ndim=1, floating=True, dtypes=HEAD_DTYPES)
        if bias.shape[0] != weight.shape[0]:
            fail(b, f"has shape {tuple(bias.shape)}; expected ({weight.shape[0]},) to match `{w}`")
        same_dtype(b, bias, w, weight)
        same_device(b, bias, w, weight)


def reference_head_parts(ref_hidden, ref_weight, ref_bias) -> None:
    """``ref_weight`` / ``ref_bias`` belong to a reference head: without ``ref_hidden`` they would be dropped."""
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        fail("ref_hidden", "is required when ref_weight/ref_bias are given (they are the reference head's)")


def check_token_inputs(
    hidden, weight, labels, *, bias, ignore_index, ref_hidden, ref_weight, ref_bias, kl, ref_entropy,
    logits_budget, chunk_size, logit_scale, softcap, temperature, flags: dict, vocab_size=None,
) -> int:
    """Validates the level-1 arguments without reading any tensor's values (no host sync); returns the
    label range: ``vocab_size`` when ``weight`` is one shard of a vocabulary-parallel head, else V."""
    labels_with(labels, ignore_index)
    _head("", hidden, weight, bias, labels)
    for name, value in flags.items():
        flag(name, value)
    if flags.get("detach_entropy") and not flags.get("entropy"):
        fail("detach_entropy", "detaches the policy entropy: it needs entropy=True")
    if ref_hidden is not None:
        _head("ref_", ref_hidden, ref_weight, ref_bias, labels)
        if ref_weight.shape[0] != weight.shape[0]:
            fail("ref_weight", f"has {ref_weight.shape[0]} vocabulary rows but `weight` has {weight.shape[0]}")
    elif kl or ref_entropy:
        fail("ref_hidden", "is required when kl=True or ref_entropy=True")
    reference_head_parts(ref_hidden, ref_weight, ref_bias)
    integer("logits_budget", logits_budget, minimum=0)
    integer("chunk_size", chunk_size, minimum=1, optional=True)
    positive("logit_scale", logit_scale)
    positive("softcap", softcap, optional=True)
    positive("temperature", temperature)
    if vocab_size is not None:
        integer("vocab_size", vocab_size, minimum=weight.shape[0])
    return vocab_size or weight.shape[0]


def non_finite(named: dict) -> list[str]:
    """Names of the tensors in ``named`` (None entries skipped) holding a NaN or an Inf.

    ``aminmax`` rather than a sum: NaN propagates through min/max, an Inf is an extreme, and unlike
    an fp32 sum a large finite bf16 value cannot overflow into a false alarm; nothing x-sized is allocated.
    """
    bad = []
    for name, x in named.items():
        if x is None or x.numel() == 0:
            continue
        lo, hi = torch.aminmax(x)
        if not (torch.isfinite(lo) & torch.isfinite(hi)).item():
            bad.append(name)
    return bad


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        fail("reduction", f"must be 'mean', 'sum' or 'none', got {reduction!r}")


def reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    check_reduction(reduction)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def per_example(name: str, x, like: torch.Tensor | None = None, *, like_name: str = "policy_chosen_logps"):
    """A per-example (pair / prompt) tensor: 1-D, floating, matching ``like`` in shape and device."""
    tensor(name, x, ndim=1)
    if not x.dtype.is_floating_point:
        fail(name, f"must be floating point, got {x.dtype}")
    if like is not None:
        if x.shape != like.shape:
            fail(name, f"has shape {tuple(x.shape)} but `{like_name}` has {tuple(like.shape)}")
        same_device(name, x, like_name, like)
