"""Module surgery: a rewritten spec rebuilt with the weights carried over (pruning, low-rank)."""
