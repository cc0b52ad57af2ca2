"""Torchvision weights onto a zoo spec's module (specs/zoo/NAME.spec mirrors torchvision's NAME).

The two modules hold the same tensors, but not always under the same names or in the same
registration order (regnet registers a shortcut before its body, convnext a block's layer scale
before the block). So tensors are paired by position: in state-dict order when the shapes agree
there, else in the order their modules finish a forward pass (both run on the meta device: no
memory, no arithmetic). A pair must have the same shape, or the same numbers of elements with a
linear's (out, in) against a 1x1 conv's (out, in, 1, 1). A classifier whose class count differs
from the data's keeps its fresh initialisation.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

import compiler
from compiler.errors import NcError
from compiler.tree import Model


def _tensors_in_state_order(module: torch.nn.Module) -> list[tuple[str, tuple]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")]


def _tensors_in_finishing_order(module: torch.nn.Module, input_shape: tuple) -> list[tuple[str, tuple]]:
    """Each module's own tensors when its forward returns (a layer scale after the block it scales)."""
    shapes = dict(_tensors_in_state_order(module))
    order: list[str] = []
    seen: set[str] = set()

    def finished(prefix):
        def hook(mod, inp, out):
            for name, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                full = f"{prefix}.{name}" if prefix else name
                if full in shapes and full not in seen:
                    seen.add(full)
                    order.append(full)
        return hook

    hooks = [m.register_forward_hook(finished(n)) for n, m in module.named_modules()]
    try:
        with torch.no_grad():
            module.eval()(torch.empty((1, *input_shape), device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return [(k, shapes[k]) for k in order] + [(k, s) for k, s in shapes.items() if k not in seen]


def _fits(ours: tuple, theirs: tuple) -> bool:
    if ours == theirs:
        return True
    squeeze = tuple(s for s in ours if s != 1) == tuple(s for s in theirs if s != 1)
    return squeeze and math.prod(ours) == math.prod(theirs) and ours[:2] == theirs[:2]


def torchvision_module(arch: str, device: str = "cpu", **kwargs) -> torch.nn.Module:
    """torchvision's `arch` without weights, in eval mode, built on `device` (meta: no memory)."""
    from compiler.torchvision_ref import build_torchvision

    return build_torchvision(arch, kwargs, device).eval()


def pairing(model: Model, arch: str, classes: int) -> dict[str, str]:
    """Our state-dict name -> torchvision's, for the zoo spec `model` of torchvision's `arch`."""
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise NcError(f"{model.name}: its tensors do not pair with torchvision's {arch}: torchvision has no such "
                      "classification model; only the specs of specs/zoo map onto torchvision weights")
    with torch.device("meta"):
        ours = compiler.build_module(model, seed=None)
    theirs = torchvision_module(arch, "meta", num_classes=classes)
    for order in (_tensors_in_state_order, lambda m: _tensors_in_finishing_order(m, model.input_shape)):
        a, b = order(ours), order(theirs)
        if len(a) == len(b) and all(_fits(x[1], y[1]) for x, y in zip(a, b)):
            return {x[0]: y[0] for x, y in zip(a, b)}
    raise NcError(f"{model.name}: its tensors do not pair with torchvision's {arch} (in state-dict or forward "
                  "order); only the specs of specs/zoo map onto torchvision weights")


def load_torchvision_state(module: torch.nn.Module, model: Model, path: str | Path, arch: str | None = None) -> int:
    """Load a torchvision state dict saved as .safetensors (never unpickled) into `module`;
    returns how many tensors were loaded. Tensors whose shapes differ (another class count) stay."""
    from safetensors.torch import load_file

    from .weights import load_into

    arch = arch or model.name
    state = load_file(str(path))
    own = module.state_dict()
    loaded = {}
    for ours, theirs in pairing(model, arch, model.root.out_shape[0]).items():
        if theirs not in state:
            raise NcError(f"{path}: no tensor `{theirs}`; expected torchvision's {arch} state dict")
        if state[theirs].numel() == own[ours].numel():  # else another class count: fresh init stays
            loaded[ours] = state[theirs].reshape(own[ours].shape)
    kept = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked")}
    load_into(module, kept | loaded, f"torchvision's {arch} weights")
    return len(loaded)
