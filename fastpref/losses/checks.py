"""Value checks for loss arguments, shared by the losses, the layouts and the fused front door.

Every check raises a ``ValueError`` naming the argument (``fastpref: `beta` ...``). Numbers are real
Python numbers or floating tensors; ``bool`` is not a number here (``True`` as a weight is a mistake),
strings are never numbers, and NaN fails every range (it would pass a careless ``not x > 0``). Flags
and integer options use :func:`fastpref._checks.flag` / :func:`fastpref._checks.integer`.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .. import _checks


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{value!r} ({type(value).__name__})"


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, like: torch.Tensor | None = None,
                 scalar: bool = False) -> None:
    """A finite real number (or floating tensor, every entry) in the given range; ends closed unless ``*_open``.

    A tensor is a 0-d value or a per-example ``[B]`` one: ``[B, 1]`` would broadcast the ``[B]`` losses to
    ``[B, B]``, and with ``like`` (the per-example values, first dimension ``B``) a 1-D tensor must have
    ``B`` entries (``[3]`` against one pair would broadcast the loss to three; one entry broadcasts
    unambiguously). ``scalar``: one value only (a setting the loss cannot take per example). A tensor costs
    one host synchronisation.
    """
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if low is not None or high is not None else ""
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            _checks.fail(name, f"must be a real number or a floating tensor, got {_describe(value)}")
        if value.dim() > 1:
            _checks.fail(name, f"must be a number, a 0-d tensor or a per-example [B] tensor, got {_describe(value)} "
                               "(it would broadcast against the per-example values)")
        if scalar and value.numel() != 1:
            _checks.fail(name, f"must be a number or a one-element tensor, got {_describe(value)}")
        if like is not None and value.dim() == 1 and value.numel() != 1:
            if value.shape[0] != like.shape[0]:
                _checks.fail(name, f"has {value.shape[0]} entries for {like.shape[0]} examples (one per example, "
                                   "or a number)")
            if value.device != like.device:
                _checks.fail(name, f"is on {value.device} but the per-example values are on {like.device}")
        v = value.detach()
        bad = ~torch.isfinite(v)
        if low is not None:
            bad = bad | ((v <= low) if low_open else (v < low))
        if high is not None:
            bad = bad | ((v >= high) if high_open else (v > high))
        if bad.any():
            _checks.fail(name, f"must be finite{where}, got values {v[bad].flatten()[:5].tolist()}")
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        _checks.fail(name, f"must be a real number, got {_describe(value)}")
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        _checks.fail(name, f"must be finite{where}, got {value!r}")


def check_positive(name: str, value, *, like: torch.Tensor | None = None, scalar: bool = False) -> None:
    """A finite number (or floating tensor) > 0."""
    check_number(name, value, low=0, low_open=True, like=like, scalar=scalar)


def check_non_negative(name: str, value, *, like: torch.Tensor | None = None, scalar: bool = False) -> None:
    """A finite number (or floating tensor) >= 0."""
    check_number(name, value, low=0, like=like, scalar=scalar)


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        _checks.fail(name, f"must be one of {choices}, got {value!r}")
    return value


def as_bool_labels(name: str, x) -> torch.Tensor:
    """A 1-D bool tensor from bool or 0/1 integer labels (floats such as 0.5 are refused, not rounded)."""
    _checks.tensor(name, x, ndim=1)
    if x.dtype == torch.bool:
        return x
    if x.dtype.is_floating_point or x.dtype.is_complex or ((x != 0) & (x != 1)).any():
        _checks.fail(name, f"must be bool or 0/1 integers, got {x.dtype}: {x.tolist()[:8]}")
    return x.bool()


def check_used(name: str, value, default, *, used: bool, only: str) -> None:
    """Refuses a setting changed from its ``default`` where it has no effect (``only`` says where it has one).

    A value the loss would drop trains something other than what was asked; its default is accepted anywhere.
    """
    changed = value != default
    if not used and (bool(changed.any()) if isinstance(changed, torch.Tensor) else changed):
        _checks.fail(name, f"is {value!r}, but it is used only {only}; here it would be ignored")
