"""`export`: the model file (as it is: fp32 or quantized) plus an ONNX graph of the model."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from compiler import onnxgraph
from compiler.analysis import budgets, onnx_key
from compiler.errors import BudgetError
from compiler.fileformat import model_format
from compiler.onnxgraph import Preprocessing, describe

from ..deploy.onnx_export import export_float, export_weights, ort_latency_ms
from ..files import atomic_write
from ..weights import ModelFile
from .base import StepConfig, StepKind, StepResult, register


class ExportConfig(StepConfig):
    kind: str = "export"
    onnx: bool = True
    # weights: the model file as it stores its weights (codes, or floats), expanded by ONNX Runtime once at
    # load: about the model file's size at the float graph's speed, predicted to the byte from the spec;
    # float: torch's exporter on the dequantized model (any model, torchvision ones too);
    # int8: weights and activations in int8 (QDQ, ONNX Runtime's static quantization, calibrated on
    # `calibration_images` training images), run by ORT's integer kernels (runtime.deploy.qdq)
    # executorch: a .pte program lowered to XNNPACK instead of the ONNX (the `mobile` extra)
    format: Literal["float", "weights", "int8", "executorch"] = "float"
    calibration_images: int = Field(256, ge=1)
    float_first_conv: bool = True  # int8: the first conv stays in float (the accuracy of small models)
    opset: int = Field(17, ge=9, le=20)  # `float` only: the opsets torch.onnx exports with the classic exporter
    # `weights` only: uint8 images in (NCHW or NHWC), scaled to [0, 1] inside the graph
    embed_preprocessing: bool = False
    layout: Literal["nchw", "nhwc"] = "nchw"
    fixed_batch: int | None = Field(None, ge=1)  # a static batch size, for runtimes that need static shapes

    @model_validator(mode="after")
    def _weights_only(self):
        if self.format != "weights" and (self.embed_preprocessing or self.fixed_batch or self.layout != "nchw"):
            raise ValueError("embed_preprocessing, layout and fixed_batch need `format: weights`")
        if self.layout != "nchw" and not self.embed_preprocessing:
            raise ValueError("`layout` is the layout of uint8 images: it needs `embed_preprocessing: true`")
        return self

    def preprocessing(self, norm=None) -> Preprocessing:
        """With the eval pipeline's `normalize` (`norm`), which the `weights` graph applies itself."""
        mean, std = (tuple(norm.mean), tuple(norm.std)) if norm is not None else (None, None)
        return Preprocessing(self.embed_preprocessing, self.layout, self.fixed_batch, mean, std)


@register
class Export(StepKind):
    kind = "export"
    config = ExportConfig

    def needs(self, cfg):
        return [cfg.model]

    def describe(self, cfg):
        if cfg.format == "executorch":
            return f"export {cfg.model}: model file + ExecuTorch program (XNNPACK)"
        form = {"weights": " (the model file's weights, expanded at load)", "int8": " (int8 QDQ)"}.get(cfg.format, "")
        return f"export {cfg.model}: model file" + (f" + ONNX{form}" if cfg.onnx else "")

    def plan_notes(self, cfg, model, fmt, classes, norm) -> list[str]:
        """The `weights` file's exact size, once the plan knows the model file's format."""
        if cfg.format != "weights" or fmt is None or any(n.op == "torchvision" for n in model.root.walk()):
            return []
        size = onnxgraph.predicted_bytes(model, fmt, classes, cfg.preprocessing(norm))
        return [f"ONNX ({fmt.name} weights): {size:,} bytes, predicted"]

    def run(self, cfg: ExportConfig, ctx, key: str = "") -> StepResult:
        slot = ctx.models[cfg.model]
        step_dir = ctx.run.step_dir(cfg.name)
        target = step_dir / f"{cfg.model}.safetensors"
        files = [f"steps/{cfg.name}/{target.name}"]
        metrics: dict = {}
        if ctx.is_main:
            atomic_write(target, slot.weights.read_bytes())
            metrics["file_bytes"] = target.stat().st_size
            if cfg.format == "executorch":
                files.append(self._executorch(cfg, ctx, slot.model, ModelFile(slot.weights), step_dir, metrics))
                return StepResult(metrics=metrics, files=files)
            if not cfg.onnx:
                ctx.log(f"{cfg.name}: {target} ({metrics['file_bytes']:,} bytes)")
                return StepResult(metrics=metrics, files=files)
            onnx_path = step_dir / f"{cfg.model}.onnx"
            file = ModelFile(slot.weights)
            module = file.build(slot.model).cpu().eval()  # the float forms and the latency yardstick
            classes = ctx.data().classes
            norm = ctx.pipeline("eval").norm  # the recipe's `normalize`: the model expects its images so
            outside = (norm.mean, norm.std) if norm is not None else None
            if cfg.format == "weights":
                self._weights(cfg, slot.model, file, onnx_path, classes, cfg.preprocessing(norm), metrics)
            elif cfg.format == "int8":
                self._int8(cfg, ctx, slot.model, module, onnx_path,
                           describe(slot.model.input_shape, classes, fmt="int8 QDQ", normalized_outside=outside),
                           metrics)
            else:
                export_float(module, slot.model.input_shape, onnx_path, cfg.opset,
                             metadata=describe(slot.model.input_shape, classes, normalized_outside=outside))
                metrics["onnx_bytes"] = onnx_path.stat().st_size
            files.append(f"steps/{cfg.name}/{onnx_path.name}")
            predicted = f", predicted {metrics['onnx_predicted_bytes']:,}" if cfg.format == "weights" else ""
            ctx.log(f"{cfg.name}: {target} ({metrics['file_bytes']:,} bytes) and {cfg.model}.onnx "
                    f"({metrics['onnx_bytes']:,} bytes{predicted})")
            self._latency(cfg, ctx, module, slot.model.input_shape, onnx_path, metrics)
            self._check_budgets(cfg, slot.model, file, metrics)
        return StepResult(metrics=metrics, files=files)

    @staticmethod
    def _weights(cfg, model, file, onnx_path, classes, pre, metrics) -> None:
        size = export_weights(file, onnx_path, model, classes, pre)
        predicted = onnxgraph.predicted_bytes(model, file.format, classes, pre)
        if size != predicted:  # the compiler's promise; a mismatch is a bug worth stopping for
            raise AssertionError(f"{onnx_path}: {size} bytes written, {predicted} predicted")
        metrics.update({"onnx_bytes": size, "onnx_predicted_bytes": predicted, "onnx_format": file.format.name})

    @staticmethod
    def _executorch(cfg, ctx, model, file, step_dir, metrics) -> str:
        from ..deploy.mobile import export_pte, pte_latency_ms

        path = step_dir / f"{cfg.model}.pte"
        module = file.build(model).cpu().eval()
        metrics["pte_bytes"] = export_pte(module, model.input_shape, path)
        with tempfile.TemporaryDirectory(dir=step_dir) as tmp:
            reference = Path(tmp) / "float.onnx"
            export_float(module, model.input_shape, reference, cfg.opset)
            float_ms = ort_latency_ms([reference], model.input_shape)
        pte_ms = pte_latency_ms(path, model.input_shape)
        metrics["pte_latency_ms"] = {"executorch": pte_ms, "onnxruntime float": float_ms and float_ms[0]}
        ctx.log(f"{cfg.name}: {path} ({metrics['pte_bytes']:,} bytes); ExecuTorch (XNNPACK), batch 1: {pte_ms:.3f} ms"
                + (f" ({float_ms[0]:.3f} ms for ONNX Runtime on the float export, 1 thread)" if float_ms else ""))
        return f"steps/{cfg.name}/{path.name}"

    @staticmethod
    def _int8(cfg, ctx, model, module, onnx_path, metadata, metrics) -> None:
        from ..deploy.qdq import export_int8, fused_ops, integer_ops

        calibration = [b.contiguous().cpu().numpy() for b in ctx.calibration(cfg.calibration_images)]
        export_int8(module, model.input_shape, calibration, onnx_path, metadata,
                    float_first_conv=cfg.float_first_conv)
        ops, float_layers = fused_ops(onnx_path)
        metrics.update({"onnx_bytes": onnx_path.stat().st_size, "onnx_integer_ops": integer_ops(ops),
                        "onnx_float_layers": float_layers})
        ctx.log(f"{cfg.name}: int8 QDQ: ONNX Runtime runs {integer_ops(ops)} integer ops"
                + (f"; still floating point: {', '.join(float_layers)}" if float_layers else ""))

    @staticmethod
    def _check_budgets(cfg, model, file, metrics) -> None:
        """The spec's `onnx(FORMAT)` budgets whose format is the exported file's, on the written file."""
        if cfg.format != "weights":
            return
        results = [b for b in budgets(model, {onnx_key(b.format): metrics["onnx_bytes"]
                                              for b in model.definition.budgets if b.metric == "onnx"})
                   if b.metric == "onnx" and model_format(model, b.format) == file.format]
        metrics["budgets"] = [{"name": b.name, "value": b.value, "ok": b.ok, "measured_on": "onnx file"}
                              for b in results]
        failed = [b for b in results if not b.ok]
        if failed:
            raise BudgetError(f"export step `{cfg.name}`: " + "; ".join(
                f"{b.name} fails: {b.value:,} bytes (onnx file)" for b in failed))

    @staticmethod
    def _latency(cfg, ctx, module, input_shape, onnx_path, metrics) -> None:
        """The written file's latency in ONNX Runtime next to the float export's (the yardstick a deployment
        would otherwise use), batch 1, one thread."""
        with tempfile.TemporaryDirectory(dir=onnx_path.parent) as tmp:
            paths = [onnx_path]
            if cfg.format != "float":
                paths.append(Path(tmp) / "float.onnx")
                export_float(module, input_shape, paths[1], cfg.opset)
            measured = ort_latency_ms(paths, input_shape)
        if measured is None:
            ctx.log(f"{cfg.name}: latency not measured: onnxruntime is not installed")
            return
        metrics["onnx_latency_ms"] = dict(zip([cfg.format, "float"], measured))
        line = f"{cfg.name}: ONNX Runtime, batch 1, 1 thread: {measured[0]:.3f} ms"
        if len(measured) == 2:
            line += f" ({measured[1]:.3f} ms for the float export, {measured[0] / measured[1]:.2f}x)"
        ctx.log(line)
