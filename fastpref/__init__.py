"""fastpref: fused, memory-efficient loss kernels for LLM preference optimisation."""

from .ops import TokenStats, backends, shift_labels, token_stats

__version__ = "0.1.0"
