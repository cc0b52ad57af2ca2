"""bench_deploy's baseline: PyTorch's int8 kernels through FX graph mode quantization (torch.ao,
announced for removal), which `integer_inference` used before ONNX Runtime replaced it.

Conv and linear layers run as int8 kernels (x86/fbgemm or qnnpack); activations are calibrated on
training images. Whatever PyTorch cannot run on integers is named (`float_layers`).
"""
from __future__ import annotations

import copy
import warnings

import torch


def integer_model(module: torch.nn.Module, calibration: list[torch.Tensor]) -> tuple[torch.nn.Module, list[str]]:
    """(int8 module, names of the layers that still compute in floating point)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engines = torch.backends.quantized.supported_engines
    engine = "x86" if "x86" in engines else ("fbgemm" if "fbgemm" in engines else "qnnpack")
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its successor
        prepared = prepare_fx(copy.deepcopy(module).cpu().eval(), get_default_qconfig_mapping(engine),
                              (calibration[0],))
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        quantized = convert_fx(prepared)
    return quantized, float_layers(quantized)


# Only move or reshape data: running them on dequantized tensors costs no arithmetic.
_SHAPE_ONLY = (torch.nn.Flatten, torch.nn.Identity, torch.nn.Dropout)
_SHAPE_ONLY_FUNCTIONS = {"flatten", "reshape", "view", "size", "getattr", "getitem"}


def float_layers(quantized: torch.fx.GraphModule) -> list[str]:
    """Layers whose inputs are dequantized first: they run in floating point."""
    names = []
    for node in quantized.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or node.target == "dequantize":
            continue
        if node.op == "call_module" and isinstance(quantized.get_submodule(node.target), _SHAPE_ONLY):
            continue
        if node.op != "call_module" and getattr(node.target, "__name__", str(node.target)) in _SHAPE_ONLY_FUNCTIONS:
            continue
        if any(isinstance(a, torch.fx.Node) and a.op == "call_method" and a.target == "dequantize"
               for a in node.all_input_nodes):
            if node.op == "call_module":
                names.append(f"{node.target} ({type(quantized.get_submodule(node.target)).__name__})")
            elif node.next.op != "output":
                names.append(f"{getattr(node.target, '__name__', node.target)}")
    return names
