"""Deployed forms of the student side by side: what a user could ship, and what nccompile ships.

One process: the student is trained by nccompile (`train` then `quantize` int8, the course's 8-bit
file) on cifar10-mini at --size, then every form a user could ship is built from that model and run
on the same images:

  torch fp32          PyTorch eager on the model file's (dequantized) weights
  torch FX int8       today's `integer_inference` (torch.ao FX, announced for removal)
  ort fp32            ONNX Runtime on nccompile's float export (BatchNorm folded by the exporter)
  ort QDQ static      ONNX Runtime's own quantize_static (QDQ, per-channel, 64 training images)
  ort int8 weights    the float export's conv/gemm weights as uint8 codes behind DequantizeLinear
                      (per output channel; what a compact file that ORT expands at load looks like)
  ... folded          the same file in a session with ORT's QDQ handling off
                      (`session.disable_quant_qdq`): constant folding expands the weights once, at load
  ort int8 Cast/Mul   the same codes expanded by Cast -> Mul(scale) -> Add(min), the file format's own
                      arithmetic: plain ops on constants, which ORT's default session folds at load
  nccompile weights   the export step's `format: weights` (runtime.deploy.export_weights): the model
                      file's own codes and ranges (per tensor, as the course's int8 file), expanded by
                      Cast -> Div(255) -> Mul(max - min) -> Add(min), grid_values' order of operations
  nccompile int8      the export step's `format: int8` (runtime.deploy.qdq): ORT's quantize_static with
                      the first conv left in float, the same 64 calibration images
  executorch xnnpack  the export step's `format: executorch` (the `mobile` extra): fp32, batch 1 only,
                      on ExecuTorch's own thread pool

For each: file bytes, top-1 accuracy on the validation images, and the median latency of one
forward pass at batch 1 and 32, with 1 thread and with every core (torch.set_num_threads /
ORT intra-op threads).

Run (OMP_WAIT_POLICY=PASSIVE: PyTorch's idle threads must not spin through the next form's turn):
     OMP_WAIT_POLICY=PASSIVE python bench/bench_deploy.py [--size 32] [--per-class 300] [--epochs 5] [--runs 50]
     [--zoo mobilenet_v2,resnet50 [--zoo-size 224] [--zoo-runs 5]] [--no-student]
The zoo tables use initial weights (no accuracy), the same forms but the per-channel DequantizeLinear ones.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "cifar10-mini"

import compiler  # noqa: E402
from bench.fx_int8 import integer_model  # noqa: E402
from runtime.deploy.onnx_export import export_float, export_weights  # noqa: E402
from runtime.run.runner import Options, run  # noqa: E402
from runtime.weights import ModelFile  # noqa: E402

RECIPE = """
name: deploy
data: {{batch_size: 64, limit_per_class: {per_class}}}
input: 3x{size}x{size}
steps:
  - {{name: train, kind: train, model: student, epochs: {epochs}}}
  - {{name: quantize, kind: quantize, model: student, format: int8}}
"""


def _images(folder: Path, size: int, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images in [0, 1] at size x size and their labels, as nccompile's eval pipeline gives them."""
    from PIL import Image

    classes = sorted(p.name for p in (folder / split).iterdir() if p.is_dir())
    xs, ys = [], []
    for label, c in enumerate(classes):
        files = sorted((folder / split / c).iterdir())[:limit]
        for f in files:
            img = Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)
            xs.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
            ys.append(label)
    return torch.stack(xs).float() / 255, torch.tensor(ys)


def _weights_form(float_path: Path, path: Path, cast: bool = False) -> None:
    """The float export with every weight of 2+ dims stored as per-channel uint8 codes, expanded by
    DequantizeLinear (a zero point: the range widened to hold 0), or with `cast` by Cast, Mul, Add on
    the file format's own grid (min + code * (max - min) / 255)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(float_path))
    graph = model.graph
    keep, nodes = [], []
    for init in graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim < 2 or w.dtype != np.float32:
            keep.append(init)
            continue
        flat = w.reshape(w.shape[0], -1)
        name, lead = init.name, (-1,) + (1,) * (w.ndim - 1)
        if cast:
            lo, hi = flat.min(1), flat.max(1)
            scale = np.where(hi > lo, (hi - lo) / 255, 1).astype(np.float32)
            codes = np.round((flat - lo[:, None]) / scale[:, None]).clip(0, 255).astype(np.uint8).reshape(w.shape)
            keep += [numpy_helper.from_array(codes, f"{name}.codes"),
                     numpy_helper.from_array(scale.reshape(lead), f"{name}.scale"),
                     numpy_helper.from_array(lo.astype(np.float32).reshape(lead), f"{name}.min")]
            nodes += [helper.make_node("Cast", [f"{name}.codes"], [f"{name}.f"], to=onnx.TensorProto.FLOAT),
                      helper.make_node("Mul", [f"{name}.f", f"{name}.scale"], [f"{name}.s"]),
                      helper.make_node("Add", [f"{name}.s", f"{name}.min"], [name])]
            continue
        lo, hi = np.minimum(flat.min(1), 0), np.maximum(flat.max(1), 0)  # zero on the grid: an exact zero point
        scale = np.where(hi > lo, (hi - lo) / 255, 1).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, 255).astype(np.uint8)
        codes = np.clip(np.round(flat / scale[:, None]) + zero[:, None], 0, 255).astype(np.uint8).reshape(w.shape)
        keep += [numpy_helper.from_array(codes, f"{name}.codes"), numpy_helper.from_array(scale, f"{name}.scale"),
                 numpy_helper.from_array(zero, f"{name}.zero")]
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.codes", f"{name}.scale", f"{name}.zero"], [name],
                                      axis=0))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)
    onnx.save(model, str(path))


def _qdq_static(float_path: Path, path: Path, calibration: torch.Tensor) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calibration[i:i + 1].numpy()} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    pre = path.with_suffix(".pre.onnx")
    quant_pre_process(str(float_path), str(pre))
    quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    pre.unlink()


def _measure(fp32, int8_file: Path, size: int, tmp: Path, runs: int, accuracy: bool) -> tuple[list[dict], int]:
    """Every form at one input size: its bytes, accuracy (at the training size) and latencies."""

    shape = (3, size, size)
    val_x, val_y = _images(DATA, size, "val")
    calib, _ = _images(DATA, size, "train", limit=7)
    calib = calib[torch.randperm(len(calib), generator=torch.Generator().manual_seed(0))[:64]]
    float_onnx, qdq_onnx = tmp / f"fp32-{size}.onnx", tmp / f"qdq-{size}.onnx"
    weights_onnx, cast_onnx = tmp / f"weights-{size}.onnx", tmp / f"cast-{size}.onnx"
    codes_onnx = tmp / f"codes-{size}.onnx"
    export_float(fp32, shape, float_onnx, 17)
    _qdq_static(float_onnx, qdq_onnx, calib)
    _weights_form(float_onnx, weights_onnx)
    _weights_form(float_onnx, cast_onnx, cast=True)
    file = ModelFile(int8_file)
    at_size = compiler.compile_spec(ROOT / "specs/student.spec", input_shape=shape, params=file.model().params)
    export_weights(file, codes_onnx, at_size)
    fx, float_layers = integer_model(fp32, [calib[i:i + 8] for i in range(0, 64, 8)])

    forms: dict[str, dict] = {
        "torch fp32": {"bytes": int8_file.stat().st_size, "predict": _torch_form(fp32)},
        "torch FX int8": {"bytes": None, "predict": _torch_form(fx)},
    }
    for name, path in (("ort fp32", float_onnx), ("ort QDQ static", qdq_onnx), ("ort int8 weights", weights_onnx)):
        forms[name] = {"bytes": path.stat().st_size, "path": path}
    forms["... folded"] = {**forms["ort int8 weights"], "config": {"session.disable_quant_qdq": "1"}}
    forms["ort int8 Cast/Mul"] = {"bytes": cast_onnx.stat().st_size, "path": cast_onnx}
    forms["nccompile weights"] = {"bytes": codes_onnx.stat().st_size, "path": codes_onnx}
    forms.update(_own_forms(fp32, shape, calib, tmp, f"student-{size}"))

    return _time_forms(forms, val_x, val_y, runs, accuracy), len(float_layers)


def _torch_form(module):
    def predict(x):
        with torch.no_grad():
            return module(x)
    return predict


def _own_forms(fp32, shape: tuple, calib: torch.Tensor, tmp: Path, tag: str) -> dict:
    """nccompile's int8 form (export `format: int8`: QDQ, first conv in float) and, with the `mobile`
    extra, its ExecuTorch program (XNNPACK, fp32, batch 1)."""
    from runtime.deploy import mobile
    from runtime.deploy.qdq import export_int8

    int8_onnx = tmp / f"{tag}-int8.onnx"
    export_int8(fp32, shape, [calib.numpy()], int8_onnx)
    forms = {"nccompile int8": {"bytes": int8_onnx.stat().st_size, "path": int8_onnx}}
    if mobile.available():
        pte = tmp / f"{tag}.pte"
        forms["executorch xnnpack"] = {"bytes": mobile.export_pte(fp32, shape, pte), "pte": pte}
    return forms


def _predictor(form: dict, threads: int):
    import onnxruntime as ort

    if "pte" in form:  # batch 1 only, on ExecuTorch's own thread pool (not set by this bench)
        from runtime.deploy.mobile import pte_runner

        run = pte_runner(form["pte"])
        return lambda x: torch.cat([run(x[i:i + 1].contiguous()) for i in range(len(x))])
    if "predict" in form:
        def predict(x):
            torch.set_num_threads(threads)
            return form["predict"](x)
        return predict
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    # idle pool threads would spin after each run, taking the cores from the next form's turn
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for k, v in form.get("config", {}).items():
        opts.add_session_config_entry(k, v)
    session = ort.InferenceSession(str(form["path"]), opts, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _time_forms(forms: dict, val_x: torch.Tensor, val_y: torch.Tensor | None, runs: int, accuracy: bool,
                rounds: int = 5) -> list[dict]:
    """Bytes, accuracy, max logit difference to the first form, and latencies of every form. The forms
    take turns (`rounds` rounds of runs/rounds calls each, in a new order every round), so a slower
    moment of the machine weighs on all of them alike; medians over every call."""
    cores = os.cpu_count() or 1
    rows, reference = [], None
    for name, form in forms.items():
        row = {"form": name, "bytes": form["bytes"], "accuracy": None}
        predict = _predictor(form, 1)
        logits = predict(val_x[:64])
        reference = logits if reference is None else reference  # torch fp32 comes first
        row["diff"] = (logits - reference).abs().max().item()
        if accuracy:
            logits = torch.cat([predict(val_x[i:i + 64]) for i in range(0, len(val_x), 64)])
            row["accuracy"] = (logits.argmax(1) == val_y).float().mean().item()
        rows.append(row)
    per_round = max(1, runs // rounds)
    for threads in (1, cores):
        predictors = [_predictor(form, threads) for form in forms.values()]
        for batch in (1, 32):
            x = val_x[:batch].contiguous()
            timed = [i for i, form in enumerate(forms.values()) if batch == 1 or "pte" not in form]
            times: dict[int, list[float]] = {i: [] for i in timed}
            for i in timed:
                for _ in range(2):
                    predictors[i](x)
            order = list(timed)
            for r in range(rounds):
                random.Random(r).shuffle(order)  # no form always runs right after the same neighbour
                for i in order:
                    for _ in range(per_round):
                        t = time.perf_counter()
                        predictors[i](x)
                        times[i].append(time.perf_counter() - t)
            for i in timed:
                rows[i][f"b{batch} t{threads}"] = statistics.median(times[i]) * 1000
    torch.set_num_threads(cores)
    return rows


def _measure_zoo(name: str, size: int, tmp: Path, runs: int) -> tuple[list[dict], int]:
    """A zoo spec with initial weights (statistics made non-trivial): every form but accuracy."""
    from runtime.weights import save_model
    from tests.measure import trained_like

    model = compiler.compile_spec(ROOT / "specs" / "zoo" / f"{name}.spec", input_shape=(3, size, size),
                                  params={"classes": 10})
    fp32 = trained_like(compiler.build_module(model))
    int8_file = tmp / f"{name}.safetensors"
    save_model(fp32, model, int8_file, "int8")
    file = ModelFile(int8_file)
    fp32 = file.build(model).eval()  # the weights the file decodes to, as in the student's table
    val_x, _ = _images(DATA, size, "val", limit=4)
    calib, _ = _images(DATA, size, "train", limit=2)
    float_onnx, qdq_onnx, codes_onnx = tmp / f"{name}-fp32.onnx", tmp / f"{name}-qdq.onnx", tmp / f"{name}-w.onnx"
    export_float(fp32, model.input_shape, float_onnx, 17)
    _qdq_static(float_onnx, qdq_onnx, calib[:16])
    export_weights(file, codes_onnx, model)
    fx, float_layers = integer_model(fp32, [calib[i:i + 8] for i in range(0, 16, 8)])

    forms = {"torch fp32": {"bytes": int8_file.stat().st_size, "predict": _torch_form(fp32)},
             "torch FX int8": {"bytes": None, "predict": _torch_form(fx)},
             "ort fp32": {"bytes": float_onnx.stat().st_size, "path": float_onnx},
             "ort QDQ static": {"bytes": qdq_onnx.stat().st_size, "path": qdq_onnx},
             "nccompile weights": {"bytes": codes_onnx.stat().st_size, "path": codes_onnx},
             **_own_forms(fp32, model.input_shape, calib[:16], tmp, name)}
    return _time_forms(forms, val_x, None, runs, False), len(float_layers)


def _student_tables(args, tmp: Path) -> list[tuple]:
    recipe = tmp / "deploy.yaml"
    recipe.write_text(RECIPE.format(per_class=args.per_class, size=args.size, epochs=args.epochs))
    out = tmp / "run"
    assert run(Options(str(ROOT / "specs/student.spec"), str(recipe), data=str(DATA), out=str(out))) == 0
    int8_file = out / "steps" / "quantize" / "model.safetensors"
    fp32 = ModelFile(int8_file).build().eval()
    return [(f"student {size}x{size}", *_measure(fp32, int8_file, size, tmp, args.runs, size == args.size))
            for size in map(int, args.sizes.split(","))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="training size (accuracy is measured there)")
    parser.add_argument("--sizes", default="32,64,256", help="input sizes to measure latency at")
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--zoo", default="", help="zoo specs to add, e.g. mobilenet_v2,resnet50 (initial weights)")
    parser.add_argument("--zoo-size", type=int, default=224)
    parser.add_argument("--zoo-runs", type=int, default=5)
    parser.add_argument("--no-student", action="store_true", help="only the zoo tables")
    args = parser.parse_args()
    import onnxruntime as ort

    torch.manual_seed(0)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tables = [] if args.no_student else _student_tables(args, tmp)
        tables += [(f"{name} {args.zoo_size}x{args.zoo_size}", *_measure_zoo(name, args.zoo_size, tmp, args.zoo_runs))
                   for name in filter(None, args.zoo.split(","))]

    print(f"\nstudent trained at {args.size}x{args.size} on cifar10-mini ({args.per_class} per class, {args.epochs} "
          f"epochs), 2,000 validation images; {cores} cores; torch {torch.__version__}, onnxruntime {ort.__version__}")
    keys = [f"b{b} t{t}" for b in (1, 32) for t in (1, cores)]
    for title, rows, float_layers in tables:
        print(f"\n{title} (FX int8 layers left in float: {float_layers}); median ms of one forward pass")
        print("| form | bytes | accuracy | max logit diff | " + " | ".join(f"{k} ms" for k in keys) + " |")
        print("|---|---:|---:|---:|" + "---:|" * len(keys))
        base = next(r for r in rows if r["form"] == "ort fp32")
        for r in rows:
            size_s = f"{r['bytes']:,}" if r["bytes"] else "not saved"
            acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
            cells = " | ".join(f"{r[k]:.3f} ({r[k] / base[k]:.2f}x)" if k in r else "-" for k in keys)
            print(f"| {r['form']} | {size_s} | {acc} | {r['diff']:.2g} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
