"""Rewriting a model's tree without torch: channels for pruning, low-rank factors, per-layer precision."""
