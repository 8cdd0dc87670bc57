"""Row kernels of the token-statistics op in C++ (``csrc/``): the default backend for CPU tensors.

Same contract as :mod:`fastpref.ops.rows_torch` (:class:`fastpref.ops.backend.RowKernels`), but each row is
read once per direction: the forward is one online max / sum-exp sweep that accumulates every
requested statistic, and the backward rewrites the logits into dL/dlogits in a single
read-modify-write sweep, with no ``[C, V]`` temporaries. OpenMP threads (torch's pool, so
``torch.set_num_threads`` applies) split the rows; the inner loops are vectorised for the best
instruction set the CPU has (AVX-512, AVX2, or the portable baseline), chosen at import.

``AVAILABLE`` is False when the extension was not built or does not load (for instance, it was built
against another torch); ``IMPORT_ERROR`` then says why, and :func:`fastpref.ops.backend.resolve` falls back to PyTorch.
``FASTPREF_CPU_ISA`` (``avx512``, ``avx2`` or ``baseline``) forces a lower kernel variant.
"""

from __future__ import annotations

import os

import torch

from .backend import Want

try:
    from . import _cpu_rows as _C
except ImportError as err:  # not built (e.g. no compiler at install time) or built for another torch
    _C = None
    IMPORT_ERROR: ImportError | None = err
else:
    IMPORT_ERROR = None
    if os.environ.get("FASTPREF_CPU_ISA"):
        try:
            _C.select_isa(os.environ["FASTPREF_CPU_ISA"])
        except ValueError as err:
            raise ValueError(f"FASTPREF_CPU_ISA: {err}") from None

AVAILABLE = _C is not None


def isa() -> str | None:
    """The instruction set the kernels run with (``"avx512"``, ``"avx2"``, ``"baseline"``), None if unavailable."""
    return _C.isa() if AVAILABLE else None


def supported_isas() -> list[str]:
    """Kernel variants that this build has and this CPU runs, best first."""
    return list(_C.supported_isas()) if AVAILABLE else []


def select_isa(name: str) -> None:
    """Switch to the kernel variant ``name`` (one of :func:`supported_isas`); for tests and benchmarks."""
    _C.select_isa(name)


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` itself when its last dimension is contiguous (what the kernels need), else a copy."""
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _vector(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.to(torch.float32).contiguous()


def forward_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    want: Want,
    ref_logits: torch.Tensor | None = None,
    softcap: float = 0.0,
    post_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    rows = logits.shape[0]
    has_ref = ref_logits is not None
    asked = {
        "lse": True,
        "logp": True,
        "entropy": want.entropy,
        "log_sum_sq_probs": want.log_sum_sq_probs,
        "mean_logits": want.mean_logits,
        "is_top1": want.is_top1,
        "ref_lse": has_ref,
        "ref_logp": has_ref,
        "ref_entropy": has_ref and want.ref_entropy,
        "kl": has_ref and want.kl,
    }
    out = {
        k: torch.empty(rows, dtype=torch.bool if k == "is_top1" else torch.float32)
        for k, on in asked.items() if on
    }
    _C.forward_rows(
        _as_rows(logits),
        target.to(torch.int64).contiguous(),
        None if ref_logits is None else _as_rows(ref_logits),
        float(softcap),
        float(post_scale),
        *(out.get(k) for k in asked),
    )
    return out


def backward_rows_(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    *,
    g_logp: torch.Tensor | None = None,
    g_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    g_kl: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    ref_lse: torch.Tensor | None = None,
    softcap: float = 0.0,
    post_scale: float = 1.0,
) -> None:
    rows = _as_rows(logits)
    _C.backward_rows_(
        rows,
        target.to(torch.int64).contiguous(),
        _vector(lse),
        _vector(g_logp),
        _vector(g_entropy),
        _vector(entropy),
        _vector(g_kl),
        None if ref_logits is None else _as_rows(ref_logits),
        _vector(ref_lse),
        float(softcap),
        float(post_scale),
    )
    if rows is not logits:
        logits.copy_(rows)
