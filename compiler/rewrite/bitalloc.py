"""Per-layer weight formats as choices: what each costs in bytes, and the spec that states them.

The `quantize` step's `format: auto` measures how much each layer's accuracy suffers in each
format (runtime.quant.autobits) and picks one per layer within a byte budget. This module is the
torch-free half: the layers of a model file, the exact bytes a layer's tensors take in a
format, and the model rewritten with a `precision` section, whose file size the analysis then
predicts exactly like any other spec's.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .. import ir
from ..fileformat import layout, parse_format, predicted_bytes, weight_tensors
from ..tree import Model
from .respec import respec

# Formats `auto` chooses from unless told otherwise: 2..8 bits per tensor and per channel, and fp16.
AUTO_CANDIDATES = tuple(f"int{b}" for b in range(2, 9)) + tuple(f"int{b}-channel" for b in range(2, 9)) + ("fp16",)


@dataclass(frozen=True)
class Layer:
    path: str                                   # the layer's path: a precision rule names it
    tensors: tuple[tuple[str, tuple[int, ...]], ...]


def layers(model: Model) -> list[Layer]:
    """The layers that own stored tensors, in module order."""
    groups: dict[str, list] = {}
    for name, shape in weight_tensors(model):
        groups.setdefault(name.rpartition(".")[0], []).append((name, tuple(shape)))
    return [Layer(path, tuple(ts)) for path, ts in groups.items()]


def layer_bytes(layer: Layer, fmt: str) -> int:
    """The data bytes of a layer's tensors in format `fmt`: codes or floats, plus 8 bytes per range."""
    lay = layout(list(layer.tensors), fmt)
    return sum(e.stored.nbytes + (8 * (e.rows[1] - e.rows[0]) if e.rows else 0) for e in lay.entries)


def options(layer: Layer, candidates=AUTO_CANDIDATES) -> list[str]:
    """The candidates that differ for this layer: per-channel is per-tensor for 1-D tensors."""
    seen, out = set(), []
    for fmt in candidates:
        f = parse_format(fmt)
        key = (f.scheme if f.quantized and any(len(s) >= 2 for _, s in layer.tensors) else "tensor",
               f.bits, f.dtype)
        if key not in seen:
            seen.add(key)
            out.append(fmt)
    return out


def with_precision(model: Model, choice: dict[str, str], comment: str = "") -> tuple[str, Model]:
    """DSL text of `model` whose `precision` section states `choice` (layer path -> format): the most
    frequent format as the default, the others as rules; and that text compiled."""
    counts = Counter(choice.values())
    default = max(sorted(counts), key=lambda f: counts[f]) if counts else "fp32"
    rules = [ir.PrecisionRule(pattern=path, format=fmt) for path, fmt in choice.items() if fmt != default]
    definition = model.definition.model_copy(update={"precision": ir.Precision(default=default, rules=rules)})
    return respec(model, definition=definition, comment=comment, label=f"{model.name} (precision chosen)")


def smallest(model: Model, candidates=AUTO_CANDIDATES) -> tuple[dict[str, str], int]:
    """Every layer in its cheapest candidate, and that file's exact bytes: no choice is smaller."""
    choice = {layer.path: min(options(layer, candidates), key=lambda f: layer_bytes(layer, f))
              for layer in layers(model)}
    _, cheapest = with_precision(model, choice)
    return choice, predicted_bytes(cheapest, "spec")
