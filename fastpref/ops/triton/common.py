"""Device helpers shared by the row kernels."""

from __future__ import annotations

import math

import triton
import triton.language as tl

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x * LOG2E): exp2 is the native instruction


@triton.jit
def tanh(x):
    """fp32 tanh from exp2 (libdevice's tanh is unavailable in the interpreter).

    The exponent is never positive, so nothing overflows for any |x|; the absolute error is about one
    fp32 ulp of 1, far below the bf16 rounding of the logits it is applied to.
    """
    # The literal is -2 * log2(e): the interpreter mishandles constexpr globals inside nested jit functions.
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def above_minus_inf(x):
    """-inf (a vocabulary row masked by a -inf bias) becomes -FLT_MAX: p stays 0 while p log p and
    p_ref (z_ref - z) become 0 * finite = 0, not NaN. A NaN compares false and is kept (for the lse check)."""
    return tl.where(x < -3.4028234663852886e38, -3.4028234663852886e38, x)
