"""Quantization: the grid codes of model files, BatchNorm folding, fake and fused quantization for
training, calibrated rounding, per-layer bit choice and the int8 path."""
