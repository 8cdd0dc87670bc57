"""Backend dispatch for the row kernels of the token-statistics op.

A backend is a pair of functions over one chunk of logits rows, ``[C, V]`` (the GEMMs that produce
the chunk stay in ``torch.mm`` for every backend):

``forward_rows(logits, target, *, want, ref_logits=None, softcap=0.0, post_scale=1.0) -> dict``
    One pass over each row. Returns fp32 ``[C]`` tensors ``"lse"`` and ``"logp"``, plus, when asked
    in ``want``: ``"entropy"``, ``"log_sum_sq_probs"`` (``log sum_v p_v^2``), ``"mean_logits"``,
    ``"is_top1"`` (bool, argmax == target with the first maximum winning); with ``ref_logits``:
    ``"ref_lse"``, ``"ref_logp"`` and, when asked, ``"ref_entropy"`` and ``"kl"`` (KL(p_ref || p)).

``backward_rows_(logits, target, lse, *, g_logp=None, g_entropy=None, entropy=None, g_kl=None,
ref_logits=None, ref_lse=None, softcap=0.0, post_scale=1.0) -> None``
    Overwrites ``logits`` with dL/d(logits) for per-row upstream gradients ``g_*`` (fp32 ``[C]``):
    ``g_logp (onehot - p) - g_entropy p (log p + H) + g_kl (p - p_ref)``, times the soft-cap
    derivative. ``ref_logits`` may be used as scratch. The backward also runs on vocabulary slices
    ``[C, v1 - v0]`` of the logits: ``lse``, ``entropy`` and ``ref_lse`` are then the full rows' values,
    ``target`` is ``label - v0``, and a target outside ``[0, v1 - v0)`` adds no one-hot term.

``logits`` may be fp32, bf16 or fp16; all math is fp32. When ``softcap > 0`` the softmax sees
``z = post_scale * softcap * tanh(logits / softcap)``, otherwise ``z = logits``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cpp")
_ENV = "FASTPREF_BACKEND"


@dataclass(frozen=True)
class Want:
    """Which optional per-token statistics a forward pass computes."""

    entropy: bool = False
    log_sum_sq_probs: bool = False
    mean_logits: bool = False
    is_top1: bool = False
    ref_entropy: bool = False
    kl: bool = False


_modules: dict[str, ModuleType | None] = {}
_warned: set[str] = set()


def _load(name: str) -> ModuleType | None:
    """The row-kernel module of backend ``name``, or None when it cannot run here."""
    if name not in _modules:
        target = {"torch": ".rows_torch", "triton": ".triton", "cpp": ".cpu"}[name]
        try:
            module = importlib.import_module(target, __package__)
            _modules[name] = module if getattr(module, "AVAILABLE", True) else None
        except ImportError:
            _modules[name] = None
    return _modules[name]


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve(device: torch.device, backend: str | None = None) -> tuple[str, ModuleType]:
    """Pick the row-kernel backend for tensors on ``device``.

    Order: the ``backend`` argument (a name, or any object with ``forward_rows`` and
    ``backward_rows_``, e.g. a wrapper that combines vocabulary shards), then the ``FASTPREF_BACKEND``
    environment variable, then the device default (CUDA: Triton; CPU: the C++ extension) with a
    fallback to ``"torch"``.
    """
    if backend is not None and not isinstance(backend, str):
        if not (hasattr(backend, "forward_rows") and hasattr(backend, "backward_rows_")):
            raise ValueError("backend must be a name or an object with forward_rows and backward_rows_")
        return getattr(backend, "__name__", type(backend).__name__), backend
    name = backend or os.environ.get(_ENV) or None
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
        module = _load(name)
        if module is None:
            raise ValueError(f"backend {name!r} is not available here (see fastpref.backends())")
        if name == "triton" and not _triton_runs_on(device):
            raise ValueError("backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
        return name, module
    preferred = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else "torch"
    module = _load(preferred)
    if module is not None:
        return preferred, module
    if preferred not in _warned:
        _warned.add(preferred)
        warnings.warn(
            f"fastpref: the {preferred!r} backend is not available for {device.type} tensors; "
            "using the slower PyTorch row kernels (see fastpref.backends()).",
            stacklevel=2,
        )
    return "torch", _load("torch")


def backends() -> dict[str, bool]:
    """Which row-kernel backends can run in this process: ``{"torch": True, "triton": ..., "cpp": ...}``."""
    return {name: _load(name) is not None for name in BACKENDS}
