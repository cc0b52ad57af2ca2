"""Deployable files: the model in forms a standard runtime runs (ONNX first)."""
