"""Level 1: the token-statistics op (the only heavy op in fastpref) and its backends."""

from .backend import Backend, RowKernels, backends, register_backend
from .token_stats import TokenStats, shift_labels, token_stats

__all__ = ["Backend", "RowKernels", "TokenStats", "backends", "register_backend", "shift_labels", "token_stats"]
