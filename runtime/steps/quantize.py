"""`quantize`: write the model in a weight format; evaluate it dequantized (and in int8 kernels)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from compiler.analysis import budgets, format_key, predicted_bytes
from compiler.errors import BudgetError, NcError
from compiler.fileformat import FORMAT_HELP, SPEC, is_format, parse_format, spec_format

from .. import distributed
from ..weights import ModelFile, compress_file, save_model
from .base import StepConfig, StepKind, StepResult, register


class QuantizeConfig(StepConfig):
    kind: str = "quantize"
    format: str = "int8"                     # fp16, int8 (the course's), int8-channel, intN, intN-channel;
                                             # spec: the spec's `precision` section
    fold_bn: bool = False                    # fold BatchNorm into the preceding conv first
    keep: list[str] = []                     # tensor-name patterns kept as floats, e.g. ["*.bias"]
    keep_dtype: Literal["fp32", "fp16"] = "fp32"
    formats: dict[str, str] = {}             # mixed precision: tensor-name pattern -> format, e.g. {"fc.*": int8}
    compress: Literal["none", "lzma"] = "none"  # also write an lzma-compressed copy (size measured)
    budget_on_compressed: bool = False       # check the spec's bytes budgets against the compressed copy
    evaluate: bool = True                    # accuracy of fp32 and of the dequantized model, side by side
    integer_inference: bool = False          # also run PyTorch's int8 CPU kernels: accuracy and latency
    calibration_batches: int = Field(8, ge=1)

    def weight_format(self, model=None):
        options = dict(keep=tuple(self.keep), keep_dtype="F16" if self.keep_dtype == "fp16" else "F32",
                       fold_bn=self.fold_bn, overrides=tuple(self.formats.items()))
        if self.format == SPEC:
            if model is not None and model.definition.precision is None:
                raise NcError(f"quantize step `{self.name}`: format `spec` needs a `precision` section in the spec "
                              f"of `{self.model}`")
            if model is not None:
                return spec_format(model, **options)
        elif not is_format(self.format):
            raise NcError(f"quantize step `{self.name}`: unknown format `{self.format}` (known: {FORMAT_HELP})")
        for pattern, fmt in self.formats.items():
            if not is_format(fmt):
                raise NcError(f"quantize step `{self.name}`: formats.{pattern}: unknown format `{fmt}` "
                              f"(known: {FORMAT_HELP})")
        return parse_format("fp32" if self.format == SPEC else self.format, **options)


@register
class Quantize(StepKind):
    kind = "quantize"
    config = QuantizeConfig

    def needs(self, cfg):
        return [cfg.model]

    def produces(self, cfg):
        return [cfg.model]

    def check(self, cfg, models, listing) -> list[str]:
        try:
            cfg.weight_format(models[cfg.model].model if cfg.model in models else None)
        except NcError as err:
            return [str(err)]
        if cfg.formats and cfg.model in models:
            from fnmatch import fnmatchcase

            from compiler.fileformat import weight_tensors

            names = [n for n, _ in weight_tensors(models[cfg.model].model, cfg.fold_bn)]
            unused = [p for p in cfg.formats if not any(fnmatchcase(n, p) for n in names)]
            if unused:
                return [f"quantize step `{cfg.name}`: formats pattern(s) {', '.join(map(repr, unused))} match no "
                        f"tensor of `{cfg.model}` (its tensors are named like {names[0]!r}, {names[-1]!r})"]
        return []

    def describe(self, cfg):
        extras = [x for x in ("fold BN" if cfg.fold_bn else "", f"keep {cfg.keep}" if cfg.keep else "",
                              f"formats {cfg.formats}" if cfg.formats else "",
                              "lzma" if cfg.compress == "lzma" else "",
                              "int8 kernels" if cfg.integer_inference else "") if x]
        return f"quantize {cfg.model} to {cfg.format}" + (f" ({', '.join(extras)})" if extras else "")

    def run(self, cfg: QuantizeConfig, ctx, key: str = "") -> StepResult:
        slot = ctx.models[cfg.model]
        fmt = cfg.weight_format(slot.model)
        module = slot.build(ctx.device, ctx.recipe.seed).eval()
        step_dir = ctx.run.step_dir(cfg.name)
        path = step_dir / "model.safetensors"
        predicted = predicted_bytes(slot.model, fmt)
        metrics: dict = {"format": fmt.name, "predicted_bytes": predicted,
                         "fp32_bytes": predicted_bytes(slot.model, "fp32")}
        if ctx.is_main:  # save_model reads the weights to the CPU; the module stays on the device
            size = save_model(module, slot.model, path, fmt)
            if size != predicted:  # the compiler's promise; a mismatch is a bug worth stopping for
                raise AssertionError(f"{path}: {size} bytes written, {predicted} predicted")
        if distributed.active():
            import torch

            torch.distributed.barrier()
        metrics["file_bytes"] = path.stat().st_size
        files = []
        if cfg.compress == "lzma" and ctx.is_main:
            xz = compress_file(path)
            metrics["compressed_bytes"] = xz.stat().st_size
            files.append(f"steps/{cfg.name}/{xz.name}")
        self._check_budgets(cfg, slot, fmt, metrics)
        if cfg.evaluate or cfg.integer_inference:
            data = ctx.data()
            fp32_acc = ctx.evaluate(module, "val").accuracy
            written = ModelFile(path)  # read once: the dequantized model on the device, and a CPU copy
            dequantized = ctx.speed.prepare(written.build(slot.model).to(ctx.device).eval())
            q = ctx.evaluate(dequantized, "val")
            q_acc, q_loss = q.accuracy, q.loss
            metrics.update(fp32_val_accuracy=fp32_acc, val_accuracy=q_acc, val_loss=q_loss,
                           accuracy_drop=fp32_acc - q_acc)
            ctx.log(f"{cfg.name}: {fmt.name} file {metrics['file_bytes']:,} bytes (fp32 {metrics['fp32_bytes']:,}); "
                    f"val accuracy {q_acc:.4f} dequantized vs {fp32_acc:.4f} fp32")
            if cfg.integer_inference:  # PyTorch's int8 kernels are CPU-only: measured there, on CPU copies
                metrics["integer"] = self._integer(cfg, ctx, written.build(slot.model).eval(),
                                                   ModelFile(slot.weights).build(slot.model).eval(), data)
        return StepResult(model_file=path, metrics=metrics, files=files)

    def _check_budgets(self, cfg, slot, fmt, metrics) -> None:
        """The spec's bytes budgets for this format, on the file as written (predicted before the run)
        or, if the user opts in, on the compressed copy as measured."""
        on_compressed = cfg.budget_on_compressed and "compressed_bytes" in metrics
        value = metrics["compressed_bytes"] if on_compressed else metrics["file_bytes"]
        measured_on = "compressed file" if on_compressed else "file"
        key = SPEC if cfg.format == SPEC else fmt.name
        results = [b for b in budgets(slot.model, {key: value}) if b.metric == "bytes" and format_key(b.format) == key]
        metrics["budgets"] = [{"name": b.name, "value": b.value, "ok": b.ok, "measured_on": measured_on}
                              for b in results]
        failed = [b for b in results if not b.ok]
        if failed:
            raise BudgetError(f"quantize step `{cfg.name}`: " + "; ".join(
                f"{b.name} fails: {b.value:,} bytes ({measured_on})" for b in failed))

    def _integer(self, cfg, ctx, dequantized, fp32, data) -> dict:
        import torch

        from ..evaluation import score_split
        from ..int8 import integer_model, latency_ms

        eval_tf = ctx.pipeline("eval")
        bs = ctx.recipe.data.batch_size
        calibration = [eval_tf(data.train.images[i * bs:(i + 1) * bs]) for i in range(cfg.calibration_batches)
                       if i * bs < len(data.train)]
        qmodel, float_ops = integer_model(dequantized, calibration)
        acc = score_split(qmodel, data.val, eval_tf, len(data.classes),
                          batch_size=ctx.recipe.data.eval_batch_size).accuracy
        one = eval_tf(data.val.images[:1])
        batch = eval_tf(data.val.images[:64])
        result = {"engine": torch.backends.quantized.engine, "val_accuracy": acc,
                  "latency_ms_batch1": {"fp32": latency_ms(fp32, one), "int8": latency_ms(qmodel, one)},
                  "latency_ms_batch64": {"fp32": latency_ms(fp32, batch, 10), "int8": latency_ms(qmodel, batch, 10)},
                  "float_layers": float_ops}
        ctx.log(f"{cfg.name}: int8 kernels ({result['engine']}): val accuracy {acc:.4f}; latency batch 1 "
                f"{result['latency_ms_batch1']['int8']:.2f} ms vs fp32 {result['latency_ms_batch1']['fp32']:.2f} ms"
                + (f"; still floating point: {', '.join(float_ops)}" if float_ops else "; every layer runs in int8"))
        return result
