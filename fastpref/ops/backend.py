"""Row-kernel backends of the token-statistics op: the contract, the registry, and the choice per call.

A backend does the per-row work on one chunk of logits ``[C, V]`` (or a vocabulary slice of it); the
GEMMs that produce the chunk stay in ``torch.mm`` for every backend. The contract is
:class:`RowKernels`; each backend is registered once, with the devices it runs on and its chunk-size
policy (:func:`register_backend`). Three ship with fastpref:

========  ==========  ===========================================================================
name      devices     row kernels
========  ==========  ===========================================================================
``cpp``   cpu         C++ in ``csrc/`` (OpenMP, AVX-512 / AVX2 / portable), built by ``setup.py``
``triton``  cuda      Triton kernels in :mod:`fastpref.ops.triton` (CPU tensors only in Triton's
                      interpreter, ``TRITON_INTERPRET=1``)
``torch`` any         plain PyTorch (:mod:`fastpref.ops.rows_torch`), the reference for the others
========  ==========  ===========================================================================

Per call (:func:`resolve`): the ``backend`` argument, else the ``FASTPREF_BACKEND`` environment
variable, else the device's default (CUDA: ``triton``; CPU: ``cpp``), falling back to ``torch`` with
one warning. float64 inputs always use ``torch`` (the fused kernels compute in fp32).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .. import _checks

ENV_VAR = "FASTPREF_BACKEND"


@dataclass(frozen=True)
class Want:
    """Which optional per-token statistics a forward pass computes."""

    entropy: bool = False
    log_sum_sq_probs: bool = False
    mean_logits: bool = False
    is_top1: bool = False
    ref_entropy: bool = False
    kl: bool = False


class RowKernels(Protocol):
    """The contract every backend implements (a module or an object with these two functions).

    ``logits`` may be fp32, bf16 or fp16 (``torch`` also takes fp64); all math is at least fp32. When
    ``softcap > 0`` the softmax sees ``z = post_scale * softcap * tanh(logits / softcap)``, otherwise
    ``z = logits`` (the op folds every other scale into the GEMM).
    """

    def forward_rows(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        *,
        want: Want,
        ref_logits: torch.Tensor | None = None,
        softcap: float = 0.0,
        post_scale: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """One pass over each row.

        Returns ``[C]`` tensors (fp32, or fp64 for fp64 logits) ``"lse"`` and ``"logp"``, plus, when
        asked in ``want``: ``"entropy"``, ``"log_sum_sq_probs"`` (``log sum_v p_v^2``),
        ``"mean_logits"``, ``"is_top1"`` (bool: argmax == target, the first maximum winning); with
        ``ref_logits``: ``"ref_lse"``, ``"ref_logp"`` and, when asked, ``"ref_entropy"`` and ``"kl"``
        (``KL(p_ref || p)``).
        """
        ...

    def backward_rows_(
        self,
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
        """Overwrite ``logits`` with dL/d(logits) for the per-row upstream gradients ``g_*`` (``[C]``).

        ``g_logp (onehot - p) - g_entropy p (log p + H) + g_kl (p - p_ref)``, times the soft-cap
        derivative; ``ref_logits`` may be used as scratch. Also called on vocabulary slices
        ``[C, v1 - v0]``: ``lse``, ``entropy`` and ``ref_lse`` are then the full rows' values,
        ``target`` is ``label - v0``, and a target outside ``[0, v1 - v0)`` adds no one-hot term.
        """
        ...


@dataclass(frozen=True)
class Backend:
    """A registered backend.

    Args:
        name: what ``backend=`` and ``FASTPREF_BACKEND`` accept.
        load: returns the :class:`RowKernels` (imported on first use), or None when this process
            cannot run them (not built, package missing).
        devices: device types the kernels take tensors of.
        chunk_bytes: bytes of logits one chunk (and one backward tile) may hold; ``chunk_fp32`` says
            whether they are counted as fp32 (backends with fp32 temporaries of the chunk's size) or
            in the input dtype.
        runs_on: an extra condition on the device (Triton on CPU needs its interpreter).
    """

    name: str
    load: Callable[[], RowKernels | None]
    devices: tuple[str, ...]
    chunk_bytes: int
    chunk_fp32: bool = True
    runs_on: Callable[[torch.device], bool] = lambda device: True

    def chunk_rows(self, vocab: int, element_size: int) -> int:
        """Rows per chunk for a ``vocab``-wide head (a multiple of 16 from 64 rows up)."""
        rows = max(1, self.chunk_bytes // ((4 if self.chunk_fp32 else element_size) * vocab))
        return rows - rows % 16 if rows >= 64 else rows


_REGISTRY: dict[str, Backend] = {}
_DEFAULTS: dict[str, str] = {}  # device type -> preferred backend
_loaded: dict[str, RowKernels | None] = {}
_warned: set[str] = set()


def register_backend(backend: Backend, *, default_for: tuple[str, ...] = ()) -> None:
    """Add a backend (see :class:`Backend`); ``default_for`` makes it the default for those device types."""
    if backend.name in _REGISTRY:
        raise ValueError(f"fastpref: backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    for device_type in default_for:
        _DEFAULTS[device_type] = backend.name


def get_backend(name: str) -> Backend:
    """The registered :class:`Backend` called ``name`` (``ValueError`` listing the names otherwise)."""
    if name not in _REGISTRY:
        _checks.fail("backend", f"must be one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def kernels(name: str) -> RowKernels | None:
    """The row kernels of backend ``name``, loaded once; None when they cannot run in this process."""
    if name not in _loaded:
        _loaded[name] = get_backend(name).load()
    return _loaded[name]


def _usable(backend: Backend, device: torch.device) -> bool:
    return device.type in backend.devices and backend.runs_on(device) and kernels(backend.name) is not None


def resolve(device: torch.device, backend: str | None = None, dtype: torch.dtype = torch.float32) -> Backend:
    """The backend for tensors of ``dtype`` on ``device`` (order in the module docstring)."""
    name = backend or os.environ.get(ENV_VAR) or None
    if name is not None:
        if not isinstance(name, str):
            _checks.fail("backend", f"must be a backend name {sorted(_REGISTRY)} or None, got {type(name).__name__}")
        chosen = get_backend(name)
        if not _usable(chosen, device):
            where = "CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors" if name == "triton" else chosen.devices
            _checks.fail("backend", f"{name!r} cannot run {device.type} tensors in this process (it needs {where}; "
                                    "see fastpref.backends())")
        if dtype == torch.float64 and name != "torch":
            _checks.fail("backend", f"{name!r} computes in fp32; float64 inputs run on backend 'torch'")
        return chosen
    if dtype == torch.float64:
        return _REGISTRY["torch"]
    preferred = _DEFAULTS.get(device.type, "torch")
    if _usable(_REGISTRY[preferred], device):
        return _REGISTRY[preferred]
    if preferred not in _warned and not torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn
        _warned.add(preferred)
        warnings.warn(
            f"fastpref: the {preferred!r} backend is not available for {device.type} tensors; "
            "using the slower PyTorch row kernels (see fastpref.backends()).",
            stacklevel=3,
        )
    return _REGISTRY["torch"]


def backends() -> dict[str, bool]:
    """Which backends can run in this process: ``{"torch": True, "triton": ..., "cpp": ...}``.

    ``triton`` is True only where it can run (a CUDA device, or its interpreter for CPU tensors);
    ``cpp`` only when the extension was built for this torch.
    """
    devices = [torch.device("cuda")] if torch.cuda.is_available() else []
    devices.append(torch.device("cpu"))
    return {name: any(_usable(b, d) for d in devices) for name, b in _REGISTRY.items()}


# Plain import statements, not importlib: torch.compile traces the first call too (dynamo runs an
# import statement, but cannot trace importlib), so the backend loads without a graph break. The
# kernel modules never raise ImportError; they say through AVAILABLE whether they can run.
def _load_torch() -> RowKernels:
    from . import rows_torch

    return rows_torch


def _load_cpp() -> RowKernels | None:
    from . import cpu

    return cpu if cpu.AVAILABLE else None


def _load_triton() -> RowKernels | None:
    from . import triton

    return triton if triton.AVAILABLE else None


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


# The PyTorch kernels allocate fp32 temporaries of the chunk's size (up to ~5 with the reference and
# KL): 128 MiB chunks. The C++ kernels have none, and MKL runs the chunk GEMMs faster with 512 rows
# than with 256 at V = 128k: 256 MiB. GPUs need a few thousand rows per chunk so that each GEMM reuses
# every byte of W it reads (~2048 rows at V = 128k in bf16): 512 MiB in the input dtype.
register_backend(Backend("torch", _load_torch, ("cpu", "cuda", "mps", "xpu"), 128 * 2**20))
register_backend(Backend("cpp", _load_cpp, ("cpu",), 256 * 2**20), default_for=("cpu",))
register_backend(Backend("triton", _load_triton, ("cuda", "cpu"), 512 * 2**20, chunk_fp32=False,
                         runs_on=_triton_runs_on), default_for=("cuda",))

__all__ = ["Backend", "RowKernels", "Want", "backends", "get_backend", "kernels", "register_backend", "resolve"]
