"""`export`: the model file (as it is: fp32 or quantized) plus an ONNX graph of the (dequantized) model."""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings

import torch
from pydantic import Field

from ..files import atomic_write
from ..weights import ModelFile
from .base import StepConfig, StepKind, StepResult, register


class ExportConfig(StepConfig):
    kind: str = "export"
    onnx: bool = True
    opset: int = Field(17, ge=9, le=20)  # the opsets torch.onnx exports with the classic exporter


@register
class Export(StepKind):
    kind = "export"
    config = ExportConfig

    def needs(self, cfg):
        return [cfg.model]

    def describe(self, cfg):
        return f"export {cfg.model}: model file" + (" + ONNX" if cfg.onnx else "")

    def run(self, cfg: ExportConfig, ctx, key: str = "") -> StepResult:
        slot = ctx.models[cfg.model]
        step_dir = ctx.run.step_dir(cfg.name)
        target = step_dir / f"{cfg.model}.safetensors"
        files = [f"steps/{cfg.name}/{target.name}"]
        metrics: dict = {}
        if ctx.is_main:
            atomic_write(target, slot.weights.read_bytes())
            metrics["file_bytes"] = target.stat().st_size
            if cfg.onnx:
                onnx_path = step_dir / f"{cfg.model}.onnx"
                self._onnx(ModelFile(slot.weights).build(slot.model).cpu().eval(), slot.model.input_shape,
                           onnx_path, cfg.opset)
                metrics["onnx_bytes"] = onnx_path.stat().st_size
                files.append(f"steps/{cfg.name}/{onnx_path.name}")
            ctx.log(f"{cfg.name}: {target} ({metrics['file_bytes']:,} bytes)"
                    + (f" and {cfg.model}.onnx ({metrics['onnx_bytes']:,} bytes)" if cfg.onnx else ""))
        return StepResult(metrics=metrics, files=files)

    @staticmethod
    def _onnx(module, input_shape, path, opset) -> None:
        import onnx

        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (torch.zeros(1, *input_shape),), tmp, dynamo=False, opset_version=opset,
                                  input_names=["images"], output_names=["logits"],
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
            onnx.checker.check_model(onnx.load(tmp))
            shutil.move(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
