"""An exported ONNX file as a module: `evaluate` and `predict` score the deployed file itself, through
ONNX Runtime on the CPU, with the same data pipeline as nccompile's own models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compiler.errors import NcError


class OnnxModelError(NcError):
    """An ONNX file that cannot be opened or does not take the run's images."""


class OnnxModule(torch.nn.Module):
    """Takes float images (N, C, H, W) as the eval pipeline gives them (in [0, 1], then `norm`, the
    recipe's normalization, if any) and feeds the graph what it declares: float32 NCHW, or uint8
    NCHW/NHWC for a graph with the preprocessing inside (the images come from uint8 files, so x * 255
    rounds back to them exactly). A static batch size is served in chunks, the last one padded."""

    def __init__(self, path: str | Path, input_shape: tuple, norm=None):
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for a missing or malformed file
            raise OnnxModelError(f"{self.path}: ONNX Runtime cannot open it ({str(err).splitlines()[0]})") from None
        # a graph that normalizes itself takes [0, 1] images: the pipeline's normalization is undone
        meta = self.session.get_modelmeta().custom_metadata_map
        self.undo = None
        if norm is not None and "nccompile.normalize" in meta:
            self.undo = (torch.tensor(norm.std).view(1, -1, 1, 1), torch.tensor(norm.mean).view(1, -1, 1, 1))
        inp = self.session.get_inputs()[0]
        self.name, self.uint8 = inp.name, inp.type == "tensor(uint8)"
        dims = list(inp.shape)
        self.batch = dims[0] if isinstance(dims[0], int) else None
        c, h, w = input_shape
        if [d for d in dims[1:]] == [h, w, c] and self.uint8:
            self.nhwc = True
        elif [d for d in dims[1:]] == [c, h, w]:
            self.nhwc = False
        else:
            raise OnnxModelError(f"{self.path}: its input {inp.name} is {dims[1:]} per image, the run's images are "
                                 f"{c}x{h}x{w}; export the model at the run's input size (or pass --input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().float().cpu()
        if self.undo is not None:
            images = images * self.undo[0] + self.undo[1]
        if self.uint8:
            images = (images * 255).round().clamp(0, 255).to(torch.uint8)
        if self.nhwc:
            images = images.permute(0, 2, 3, 1)
        feed = np.ascontiguousarray(images.numpy())
        n = len(feed)
        if self.batch is None:
            out = self.session.run(None, {self.name: feed})[0]
        else:
            pad = -n % self.batch
            if pad:
                feed = np.concatenate([feed, np.repeat(feed[-1:], pad, axis=0)])
            out = np.concatenate([self.session.run(None, {self.name: feed[i:i + self.batch]})[0]
                                  for i in range(0, len(feed), self.batch)])[:n]
        return torch.from_numpy(out).to(x.device)
