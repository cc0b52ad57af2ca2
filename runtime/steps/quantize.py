"""`quantize`: write the model in a weight format; evaluate it dequantized (and in int8 kernels)."""
from __future__ import annotations

import math
from collections import Counter
from typing import Literal

from pydantic import Field

from compiler.analysis import budgets, format_key, predicted_bytes
from compiler.errors import BudgetError, NcError
from compiler.expr import evaluate
from compiler.fileformat import FORMAT_HELP, SPEC, is_format, parse_format
from compiler.rewrite import bitalloc
from compiler.rewrite.bitalloc import AUTO_CANDIDATES

from ..files import atomic_write
from ..quant import autobits
from ..train import distributed
from ..weights import ModelFile, compress_file, save_model
from .base import StepConfig, StepKind, StepResult, register
from .formats import resolve_format, unmatched_patterns


class QuantizeConfig(StepConfig):
    kind: str = "quantize"
    format: str = "int8"                     # fp16, int8 (the course's), int8-channel, intN, intN-channel;
                                             # spec: the spec's `precision` section;
                                             # auto: each layer's format chosen for max_bytes (runtime.quant.autobits)
    max_bytes: int | None = Field(None, ge=1)  # auto: the file's byte budget (default: the spec's bytes(spec))
    candidates: list[str] = list(AUTO_CANDIDATES)  # auto: the formats a layer may get
    rounding: Literal["nearest", "calibrated"] = "nearest"  # calibrated: GPTQ on calibration images
    calibration_images: int = Field(256, ge=1)  # training images for `calibrated` and `auto`
    fold_bn: bool = False                    # fold BatchNorm into the preceding conv first
    keep: list[str] = []                     # tensor-name patterns kept as floats, e.g. ["*.bias"]
    keep_dtype: Literal["fp32", "fp16"] = "fp32"
    fallback: str | None = None              # the format for `spec` when the spec has no precision section
    formats: dict[str, str] = {}             # mixed precision: tensor-name pattern -> format, e.g. {"fc.*": int8}
    compress: Literal["none", "lzma"] = "none"  # also write an lzma-compressed copy (size measured)
    budget_on_compressed: bool = False       # check the spec's bytes budgets against the compressed copy
    evaluate: bool = True                    # accuracy of fp32 and of the dequantized model, side by side
    integer_inference: bool = False          # also run the int8 model in ONNX Runtime: accuracy, latency
    calibration_batches: int = Field(8, ge=1)

    @property
    def where(self) -> str:
        return f"quantize step `{self.name}`"

    def weight_format(self, model=None):
        if self.format == AUTO:  # the chosen precision, once chosen; checked without it before
            return resolve_format(self.where, SPEC, model if model is not None and model.definition.precision
                                  else None, formats=self.formats, keep=tuple(self.keep), fold_bn=self.fold_bn)
        return resolve_format(self.where, self.format, model, fallback=self.fallback,
                              formats=self.formats, keep=tuple(self.keep),
                              keep_dtype="F16" if self.keep_dtype == "fp16" else "F32", fold_bn=self.fold_bn)


AUTO = "auto"


def auto_budget(cfg: QuantizeConfig, model) -> int | None:
    """`max_bytes`, else the tightest `bytes(spec)` budget of the spec."""
    if cfg.max_bytes is not None:
        return cfg.max_bytes
    limits = [evaluate(b.limit, model.params) for b in model.definition.budgets
              if b.metric == "bytes" and b.format == SPEC]
    return min(limits) if limits else None


@register
class Quantize(StepKind):
    kind = "quantize"
    config = QuantizeConfig

    def needs(self, cfg):
        return [cfg.model]

    def produces(self, cfg):
        return [cfg.model]

    def check(self, cfg, models, listing) -> list[str]:
        model = models[cfg.model].model if cfg.model in models else None
        try:
            cfg.weight_format(None if cfg.format == AUTO else model)
        except NcError as err:
            return [str(err)]
        problems = []
        if cfg.rounding == "calibrated" and cfg.fold_bn:
            problems.append(f"{cfg.where}: rounding `calibrated` works on the unfolded layers; drop fold_bn "
                            f"or use rounding `nearest`")
        if cfg.format == AUTO:
            problems += self._check_auto(cfg, model)
        if model is not None:
            problems += unmatched_patterns(cfg.where, cfg.formats, model, cfg.fold_bn)
        return problems

    @staticmethod
    def _check_auto(cfg, model) -> list[str]:
        bad = [f for f in cfg.candidates if not is_format(f)]
        if bad or not cfg.candidates:
            return [f"{cfg.where}: candidates: {', '.join(map(repr, bad)) or 'none given'} "
                    f"(each must be a format: {FORMAT_HELP})"]
        if cfg.formats or cfg.keep or cfg.fold_bn:
            return [f"{cfg.where}: format `auto` chooses every layer's format; it takes no formats, keep or fold_bn"]
        if model is None:
            return []
        budget = auto_budget(cfg, model)
        if budget is None:
            return [f"{cfg.where}: format `auto` needs a byte budget\n  hint: set max_bytes, or give the spec a "
                    f"`budget bytes(spec) <= N`"]
        _, least = bitalloc.smallest(model, cfg.candidates)
        if least > budget:
            return [f"{cfg.where}: no choice of formats fits {budget:,} bytes: the smallest file, every layer in its "
                    f"cheapest candidate, takes {least:,} bytes\n  hint: raise the budget, allow fewer bits "
                    f"(candidates), or make the model smaller"]
        return []

    def describe(self, cfg):
        extras = [x for x in ("fold BN" if cfg.fold_bn else "", f"keep {cfg.keep}" if cfg.keep else "",
                              f"formats {cfg.formats}" if cfg.formats else "",
                              "lzma" if cfg.compress == "lzma" else "",
                              "int8 in ONNX Runtime" if cfg.integer_inference else "") if x]
        return f"quantize {cfg.model} to {cfg.format}" + (f" ({', '.join(extras)})" if extras else "")

    def run(self, cfg: QuantizeConfig, ctx, key: str = "") -> StepResult:
        slot = ctx.models[cfg.model]
        module = slot.build(ctx.device, ctx.recipe.seed).eval()
        step_dir = ctx.run.step_dir(cfg.name)
        path = step_dir / "model.safetensors"
        model, metrics, files = slot.model, {}, []
        scored = cfg.evaluate or cfg.integer_inference
        fp32_acc = ctx.evaluate(module, "val").accuracy if scored else None  # before any rounding in place
        spec_file = None
        if cfg.format == AUTO:
            model, spec_file = self._auto(cfg, ctx, module, slot.model, step_dir, metrics)
            files.append(f"steps/{cfg.name}/{spec_file.name}")
        fmt = cfg.weight_format(model)
        ranges = None
        if cfg.rounding == "calibrated":
            ranges = self._calibrated(cfg, ctx, module, model, fmt, metrics)
        predicted = predicted_bytes(model, fmt)
        metrics.update({"format": fmt.name, "predicted_bytes": predicted, "fp32_bytes": predicted_bytes(model, "fp32")})
        if ctx.is_main:  # save_model reads the weights to the CPU; the module stays on the device
            size = save_model(module, model, path, fmt, ranges)
            if size != predicted:  # the compiler's promise; a mismatch is a bug worth stopping for
                raise AssertionError(f"{path}: {size} bytes written, {predicted} predicted")
        if distributed.active():
            import torch

            torch.distributed.barrier()
        metrics["file_bytes"] = path.stat().st_size
        if cfg.compress == "lzma" and ctx.is_main:
            xz = compress_file(path)
            metrics["compressed_bytes"] = xz.stat().st_size
            files.append(f"steps/{cfg.name}/{xz.name}")
        self._check_budgets(cfg, model, fmt, metrics)
        if scored:
            data = ctx.data()
            written = ModelFile(path)  # read once: the dequantized model on the device, and a CPU copy
            dequantized = ctx.speed.prepare(written.build(model).to(ctx.device).eval())
            q = ctx.evaluate(dequantized, "val")
            q_acc, q_loss = q.accuracy, q.loss
            metrics.update(fp32_val_accuracy=fp32_acc, val_accuracy=q_acc, val_loss=q_loss,
                           accuracy_drop=fp32_acc - q_acc)
            label = fmt.name + (f" (+ {len(fmt.overrides)} per-layer exceptions)" if fmt.overrides else "")
            ctx.log(f"{cfg.name}: {label} file {metrics['file_bytes']:,} bytes (fp32 {metrics['fp32_bytes']:,}); "
                    f"val accuracy {q_acc:.4f} dequantized vs {fp32_acc:.4f} fp32")
            if cfg.integer_inference:  # ONNX Runtime's int8 kernels, on the CPU
                metrics["integer"] = self._integer(cfg, ctx, written.build(model).cpu().eval(), model, data)
        return StepResult(model_file=path, spec_file=spec_file, metrics=metrics, files=files)

    def _auto(self, cfg, ctx, module, model, step_dir, metrics):
        """Each layer's format for the budget; the model becomes the spec that states them."""
        budget = auto_budget(cfg, model)
        batches = ctx.calibration(cfg.calibration_images)
        sens = autobits.sensitivity(module, model, batches, cfg.candidates)
        choice, text, chosen = autobits.choose(model, sens, budget, cfg.where, comment=(
            f"{model.name} with each layer's weight format chosen by nccompile for a {budget:,}-byte file\n"
            f"(quantize step `{cfg.name}`, format auto, {cfg.calibration_images} calibration images)"))
        spec_file = step_dir / "precision.spec"
        if ctx.is_main:
            atomic_write(spec_file, text.encode())
        sizes = {layer.path: sum(math.prod(s) for _, s in layer.tensors) for layer in bitalloc.layers(model)}
        weighted = sum(parse_format(choice[p]).bits * n for p, n in sizes.items())
        metrics["auto"] = {"budget": budget, "choice": choice, "sensitivity": sens,
                           "bits_per_value": weighted / max(1, sum(sizes.values()))}  # codes only, ranges aside
        ctx.log(f"{cfg.name}: formats chosen for {budget:,} bytes: "
                + ", ".join(f"{n} x {f}" for f, n in Counter(choice.values()).most_common()))
        return chosen, spec_file

    def _calibrated(self, cfg, ctx, module, model, fmt, metrics):
        """GPTQ rounding in place; the round-to-nearest accuracy beside it, for comparison."""
        import copy

        from ..quant.calibrated import calibrate
        from ..quant.codes import decode, encode
        from ..weights import state_tensors

        if cfg.evaluate:
            nearest = copy.deepcopy(module)
            stored = state_tensors(module)
            nearest.load_state_dict(decode(encode(stored, fmt), fmt, {k: tuple(v.shape) for k, v in stored.items()}),
                                    strict=False)
            metrics["nearest_val_accuracy"] = ctx.evaluate(nearest.eval(), "val").accuracy
        ranges = calibrate(module, fmt, ctx.calibration(cfg.calibration_images))
        ctx.log(f"{cfg.name}: calibrated rounding (GPTQ) of {len(ranges)} layers on {cfg.calibration_images} images"
                + (f"; round-to-nearest scores {metrics['nearest_val_accuracy']:.4f}" if cfg.evaluate else ""))
        metrics["calibrated_layers"] = len(ranges)
        return ranges

    def reshapes(self, cfg) -> bool:
        return cfg.format == AUTO  # writes the spec with the chosen formats

    def written_format(self, cfg, model):
        return None if cfg.format == AUTO else cfg.weight_format(model)  # auto: chosen while it runs

    def predicted_budget_failures(self, cfg, model) -> list[str]:
        """The file is written at exactly its predicted size (checked when written), so a format, `keep`
        or `formats` that breaks a bytes budget is known before any training."""
        if cfg.format == AUTO or cfg.budget_on_compressed:  # auto fits the budget; a compressed size is measured
            return []
        fmt = cfg.weight_format(model)
        failed = [b for b in self._file_budgets(cfg, model, fmt, predicted_bytes(model, fmt)) if not b.ok]
        return [self._failure(cfg, failed, "predicted file")] if failed else []

    @staticmethod
    def _file_budgets(cfg, model, fmt, value: int) -> list:
        """The spec's bytes budgets that this step's file answers, at `value` bytes."""
        key = SPEC if cfg.format in (SPEC, AUTO) and model.definition.precision is not None else fmt.name
        return [b for b in budgets(model, {key: value}) if b.metric == "bytes" and format_key(b.format) == key]

    @staticmethod
    def _failure(cfg, failed, measured_on: str) -> str:
        return f"quantize step `{cfg.name}`: " + "; ".join(
            f"{b.name} fails: {b.value:,} bytes ({measured_on})" for b in failed)

    def _check_budgets(self, cfg, model, fmt, metrics) -> None:
        """The spec's bytes budgets for this format, on the file as written (predicted before the run)
        or, if the user opts in, on the compressed copy as measured."""
        on_compressed = cfg.budget_on_compressed and "compressed_bytes" in metrics
        value = metrics["compressed_bytes"] if on_compressed else metrics["file_bytes"]
        measured_on = "compressed file" if on_compressed else "file"
        results = self._file_budgets(cfg, model, fmt, value)
        metrics["budgets"] = [{"name": b.name, "value": b.value, "ok": b.ok, "measured_on": measured_on}
                              for b in results]
        failed = [b for b in results if not b.ok]
        if failed:
            raise BudgetError(self._failure(cfg, failed, measured_on))

    def _integer(self, cfg, ctx, dequantized, model, data) -> dict:
        """The int8 model as ONNX Runtime runs it (QDQ, runtime.deploy.qdq): its accuracy on the val split,
        its latency next to ORT on the float export of the same weights, and the layers left in float."""
        import tempfile
        from pathlib import Path

        from ..deploy.onnx_export import export_float, ort_latency_ms
        from ..deploy.onnx_module import OnnxModule
        from ..deploy.qdq import export_int8, fused_ops, integer_ops
        from ..train.evaluation import score_split

        eval_tf = ctx.pipeline("eval")
        bs = ctx.recipe.data.batch_size
        batches = min(cfg.calibration_batches, -(-len(data.train) // bs))  # no more than the training set has
        calibration = [eval_tf(data.train.images[i * bs:(i + 1) * bs]).numpy() for i in range(batches)]
        shape = model.input_shape
        with tempfile.TemporaryDirectory(dir=ctx.run.step_dir(cfg.name)) as tmp:
            int8_path, float_path = Path(tmp) / "int8.onnx", Path(tmp) / "float.onnx"
            export_int8(dequantized, shape, calibration, int8_path)
            export_float(dequantized, shape, float_path, 17)
            acc = score_split(OnnxModule(int8_path, shape), data.val, eval_tf, len(data.classes),
                              batch_size=ctx.recipe.data.eval_batch_size).accuracy
            one = ort_latency_ms([int8_path, float_path], shape)
            many = ort_latency_ms([int8_path, float_path], shape, rounds=3, runs=5, batch=64)
            ops, float_layers = fused_ops(int8_path)
        result = {"engine": "onnxruntime (QDQ, CPU)", "val_accuracy": acc,
                  "latency_ms_batch1": {"fp32": one[1], "int8": one[0]},
                  "latency_ms_batch64": {"fp32": many[1], "int8": many[0]},
                  "integer_ops": integer_ops(ops), "float_layers": float_layers}
        ctx.log(f"{cfg.name}: int8 in ONNX Runtime (QDQ): val accuracy {acc:.4f}; latency batch 1 "
                f"{one[0]:.3f} ms vs {one[1]:.3f} ms for ORT on the float export"
                + (f"; still floating point: {', '.join(float_layers)}" if float_layers
                   else "; every conv and gemm runs in int8"))
        return result
