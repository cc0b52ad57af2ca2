"""`export`: the model file (as it is: fp32 or quantized) plus an ONNX graph of the model."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..deploy.onnx_export import describe, export_float, export_weights, ort_latency_ms
from ..files import atomic_write
from ..weights import ModelFile
from .base import StepConfig, StepKind, StepResult, register


class ExportConfig(StepConfig):
    kind: str = "export"
    onnx: bool = True
    # float: the dequantized model as float initializers; weights: the model file's own codes, expanded
    # by ONNX Runtime once at load (about the model file's size, the float graph's speed)
    format: Literal["float", "weights"] = "float"
    opset: int = Field(17, ge=9, le=20)  # the opsets torch.onnx exports with the classic exporter


@register
class Export(StepKind):
    kind = "export"
    config = ExportConfig

    def needs(self, cfg):
        return [cfg.model]

    def describe(self, cfg):
        form = " (the model file's codes, expanded at load)" if cfg.format == "weights" else ""
        return f"export {cfg.model}: model file" + (f" + ONNX{form}" if cfg.onnx else "")

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
                file = ModelFile(slot.weights)
                module = file.build(slot.model).cpu().eval()
                meta = describe(slot.model.input_shape, ctx.data().classes)
                if cfg.format == "weights":
                    export_weights(module, file, onnx_path, cfg.opset, meta, slot.model)
                else:
                    export_float(module, slot.model.input_shape, onnx_path, cfg.opset, metadata=meta)
                metrics["onnx_bytes"] = onnx_path.stat().st_size
                files.append(f"steps/{cfg.name}/{onnx_path.name}")
            ctx.log(f"{cfg.name}: {target} ({metrics['file_bytes']:,} bytes)"
                    + (f" and {cfg.model}.onnx ({metrics['onnx_bytes']:,} bytes)" if cfg.onnx else ""))
            if cfg.onnx:
                self._latency(cfg, ctx, module, onnx_path, slot.model.input_shape, metrics)
        return StepResult(metrics=metrics, files=files)

    @staticmethod
    def _latency(cfg, ctx, module, onnx_path, input_shape, metrics) -> None:
        """The written file's latency in ONNX Runtime next to the float export's (the yardstick a deployment
        would otherwise use), batch 1, one thread."""
        if cfg.format == "float":
            measured = ort_latency_ms([onnx_path], input_shape)
            if measured is None:
                ctx.log(f"{cfg.name}: latency not measured: onnxruntime is not installed")
                return
            metrics["onnx_latency_ms"] = {"float": measured[0]}
            ctx.log(f"{cfg.name}: ONNX Runtime, batch 1, 1 thread: {measured[0]:.3f} ms")
            return
        with tempfile.TemporaryDirectory(dir=onnx_path.parent) as tmp:
            reference = Path(tmp) / "float.onnx"
            export_float(module, input_shape, reference, cfg.opset)
            measured = ort_latency_ms([onnx_path, reference], input_shape)
        if measured is None:
            ctx.log(f"{cfg.name}: latency not measured: onnxruntime is not installed")
            return
        shipped, float_ms = measured
        metrics["onnx_latency_ms"] = {cfg.format: shipped, "float": float_ms}
        ctx.log(f"{cfg.name}: ONNX Runtime, batch 1, 1 thread: {shipped:.3f} ms ({float_ms:.3f} ms for the float "
                f"export, {shipped / float_ms:.2f}x)")
