"""Input validation shared by every level: clear ``ValueError``s that name the offending argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fail(arg: str, message: str) -> None:
    raise ValueError(f"fastpref: `{arg}` {message}")


def tensor(arg: str, x, *, ndim: int | None = None, min_ndim: int | None = None, floating: bool | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        fail(arg, f"must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        fail(arg, f"must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        fail(arg, f"must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    if floating is True and x.dtype not in FLOAT_DTYPES:
        fail(arg, f"must be float32, bfloat16 or float16, got {x.dtype}")
    if floating is False and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        fail(arg, f"must be an integer tensor, got {x.dtype}")


def same_device(arg: str, x: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        fail(arg, f"is on {x.device} but `{ref_arg}` is on {ref.device}")


def same_dtype(arg: str, x: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        fail(arg, f"has dtype {x.dtype} but `{ref_arg}` has {ref.dtype}")


def _head(prefix: str, hidden, weight, bias, labels) -> None:
    """Checks one (hidden, weight, bias) head against ``labels``; ``prefix`` is "" or "ref_"."""
    h, w, b = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    tensor(h, hidden, min_ndim=1, floating=True)
    tensor(w, weight, ndim=2, floating=True)
    if hidden.shape[:-1] != labels.shape:
        fail(h, f"has shape {tuple(hidden.shape)}; expected labels.shape + (d,) = {tuple(labels.shape)} + (d,)")
    if weight.shape[1] != hidden.shape[-1]:
        fail(w, f"has shape {tuple(weight.shape)}; expected (V, {hidden.shape[-1]}) to match `{h}`")
    same_dtype(w, weight, h, hidden)
    same_device(h, hidden, "labels", labels)
    same_device(w, weight, "labels", labels)
    if bias is not None:
        tensor(b, bias, ndim=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            fail(b, f"has shape {tuple(bias.shape)}; expected ({weight.shape[0]},) to match `{w}`")
        same_dtype(b, bias, w, weight)
        same_device(b, bias, w, weight)


def check_token_inputs(
    hidden, weight, labels, *, bias, ignore_index, ref_hidden, ref_weight, ref_bias, kl, ref_entropy,
    logits_budget, chunk_size, softcap, temperature, vocab_size=None,
) -> tuple[int, torch.Tensor]:
    """Validates level-1 inputs; returns (number of valid tokens, valid mask). One host sync.

    ``vocab_size``: the label range when ``weight`` is one shard of a vocabulary-parallel head.
    """
    tensor("labels", labels, floating=False)
    _head("", hidden, weight, bias, labels)
    if ref_hidden is not None:
        _head("ref_", ref_hidden, ref_weight, ref_bias, labels)
        if ref_weight.shape[0] != weight.shape[0]:
            fail("ref_weight", f"has {ref_weight.shape[0]} vocabulary rows but `weight` has {weight.shape[0]}")
    elif kl or ref_entropy:
        fail("ref_hidden", "is required when kl=True or ref_entropy=True")
    elif ref_weight is not None or ref_bias is not None:
        fail("ref_hidden", "is required when ref_weight/ref_bias are given")
    if not isinstance(logits_budget, int) or logits_budget < 0:
        fail("logits_budget", f"must be a non-negative number of bytes, got {logits_budget!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        fail("chunk_size", f"must be a positive int or None, got {chunk_size!r}")
    if softcap is not None and not softcap > 0:
        fail("softcap", f"must be positive or None, got {softcap!r}")
    if not temperature > 0:
        fail("temperature", f"must be positive, got {temperature!r}")

    vocab = vocab_size or weight.shape[0]
    valid = labels != ignore_index
    bad_label = valid & ((labels < 0) | (labels >= vocab))
    # One host sync for every value check (the reference head is frozen: its weight is not re-checked).
    # A NaN or Inf anywhere makes the fp32 sum non-finite; unlike isfinite(x).all() it allocates nothing.
    checked = {"hidden": hidden, "weight": weight, "bias": bias, "ref_hidden": ref_hidden}
    checked = {name: x for name, x in checked.items() if x is not None}
    flags = [valid.sum(), bad_label.any()] + [~torch.isfinite(x.sum(dtype=torch.float32)) for x in checked.values()]
    num_valid, has_bad_label, *nonfinite = torch.stack([f.to(torch.int64) for f in flags]).tolist()
    if has_bad_label:
        bad = labels[bad_label]
        fail("labels", f"has values outside [0, {vocab}) that are not ignore_index={ignore_index}: "
                       f"{bad[:5].tolist()}")
    for name, flag in zip(checked, nonfinite):
        if flag:
            fail(name, "contains NaN or Inf")
    return num_valid, valid


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
