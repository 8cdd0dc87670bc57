"""Level 1: the token-statistics op (the only heavy op in fastpref) and its backends."""

from .dispatch import backends
from .token_stats import TokenStats, shift_labels, token_stats

__all__ = ["TokenStats", "backends", "shift_labels", "token_stats"]
