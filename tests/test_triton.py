"""What is particular to the Triton row kernels (the CUDA backend): device resolution, 64-bit row offsets,
and forcing the backend. The contract itself (every backend, one set of cases) is tests/test_backends.py.

On a CUDA machine the kernels run compiled; without CUDA, ``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before triton is imported, so they run in Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import fastpref  # noqa: E402
from fastpref.ops import backend as registry  # noqa: E402
from fastpref.ops import rows_torch  # noqa: E402
from fastpref.ops.backend import Want  # noqa: E402
from oracle import rel_err  # noqa: E402

triton_rows = registry.kernels("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_cuda_tensors_resolve_to_triton(monkeypatch):
    monkeypatch.delenv("FASTPREF_BACKEND", raising=False)
    assert registry.resolve(torch.device("cuda")).name == "triton"  # resolution only: no CUDA tensor is made


def test_int64_row_offsets():
    # Row 2 starts 2**31 + 128 elements into the buffer: int32 row * stride would wrap (and crash).
    # The 4 GiB buffer is never touched beyond the three rows (lazily committed on CPU).
    vocab, stride = 300, 2**30 + 64
    buf = torch.empty(2 * stride + vocab, dtype=torch.bfloat16, device=DEVICE)
    z = buf.as_strided((3, vocab), (stride, 1))
    z.copy_(torch.randn(3, vocab))
    y = torch.tensor([0, 150, 299], device=DEVICE)
    want = rows_torch.forward_rows(z.clone(), y, want=Want(entropy=True))
    got = triton_rows.forward_rows(z, y, want=Want(entropy=True))
    for key in want:
        assert rel_err(got[key], want[key]) < 1e-5, key
    dz = z.clone()
    rows_torch.backward_rows_(dz, y, want["lse"], g_logp=torch.ones(3, device=DEVICE))
    triton_rows.backward_rows_(z, y, want["lse"], g_logp=torch.ones(3, device=DEVICE))
    assert rel_err(z, dz) < 2.0**-7  # one bf16 step (the interpreter truncates)


def test_backend_forced_by_environment(monkeypatch):
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    assert registry.resolve(torch.device(DEVICE)).name == "triton"
    assert fastpref.backends()["triton"]
    monkeypatch.setenv("FASTPREF_BACKEND", "no_such_backend")
    with pytest.raises(ValueError, match="backend"):
        registry.resolve(torch.device(DEVICE))


def test_launch_config_knobs(monkeypatch):
    """The GPU check's tuning sweep sets BLOCK / num_warps through the environment; bad values are refused."""
    launch_config = triton_rows.launch_config
    assert launch_config(128_256) == (4096, 8) and launch_config(7) == (8, 1)
    monkeypatch.setenv("FASTPREF_TRITON_BLOCK", "1024")
    monkeypatch.setenv("FASTPREF_TRITON_WARPS", "4")
    assert launch_config(128_256) == (1024, 4)
    monkeypatch.setenv("FASTPREF_TRITON_BLOCK", "1000")
    with pytest.raises(ValueError, match="FASTPREF_TRITON_BLOCK"):
        launch_config(128_256)
