"""Structured channel pruning with physical removal, by rewriting the spec.

The pruned architecture is a new spec (`compiler.emit` of the rewritten tree): it
compiles, its counts are exact, and the kept weights are copied into the module
built from it, so file size and latency really shrink and the state dict always
matches its spec.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from compiler.analysis import predicted_latency
from compiler.ops import PRODUCES, WEIGHTED, record
from compiler.rewrite.channels import Spaces, analyse_channels, rewrite
from compiler.tree import Model

from ..weights import state_tensors
from .rebuild import rebuild


def importance(module: torch.nn.Module, spaces: Spaces, method: str, seed: int = 0) -> dict[int, torch.Tensor]:
    """One score per channel of every prunable space (higher = keep).

    bn: |gamma| summed over the space's BatchNorms (network slimming); l1/l2: norms of the
    filters that produce the channels; random: a baseline. A space without BatchNorm
    falls back to l1.
    """
    named = dict(module.named_modules())
    g = torch.Generator().manual_seed(seed)
    scores = {}
    for space in spaces.prunable():
        members = spaces.members(space)
        size = spaces.size[space]
        score = torch.zeros(size)
        if method == "random":
            scores[space] = torch.rand(size, generator=g)
            continue
        scaled = [(u, name) for u in members if (name := record(u.node.op).channel_scale(u.node.attrs))]
        if method == "bn" and scaled:
            for u, name in scaled:  # a BatchNorm after a concatenation holds this space's channels at an offset
                gamma = named[u.node.path].get_parameter(name).detach().abs().cpu()
                for at in spaces.offsets(u.outs, space):
                    score += gamma[at:at + size]
        else:
            p = 2 if method == "l2" else 1
            for u in members:
                if u.role == PRODUCES:
                    w = named[u.node.path].weight.detach().cpu()
                    score += w.reshape(w.shape[0], -1).norm(p=p, dim=1)
        scores[space] = score
    return scores


def _rounded(k: int, size: int, multiple: int, minimum: int) -> int:
    """Channel counts that CPU kernels like: a multiple of `multiple` (never above `size`). A space of
    one multiple or less stays whole: fewer channels run no faster there (ORT pads them to its block),
    and a 1-channel layer would starve the network (a bench_latency finding at block 16)."""
    if multiple > 1:
        if size <= multiple:
            return size
        k = max(multiple, round(k / multiple) * multiple)
    return min(size, max(minimum, k))


def choose(scores: dict[int, torch.Tensor], rate: float, scope: str, min_channels: int = 1,
           multiple: int = 1, costs: dict[int, float] | None = None, min_rate: float = 0.0,
           cost_power: float = 0.5) -> dict[int, torch.Tensor]:
    """Kept channel indices (sorted) per space: `rate` = fraction kept, per layer or globally;
    counts are rounded to a multiple of `multiple` (the best-scoring channels are kept).

    Global scope with `costs` (per-channel cost of each space, e.g. activations per channel)
    ranks channels by importance / cost**cost_power, so expensive high-resolution layers are
    pruned harder; `min_rate` keeps at least that fraction of every space.
    """
    kept = {}

    def min_channels_of(n: int) -> int:
        return max(min_channels, math.ceil(min_rate * n))

    if scope == "layer":
        for space, s in scores.items():
            k = _rounded(round(rate * len(s)), len(s), multiple, min_channels)
            kept[space] = torch.topk(s, k).indices.sort().values
        return kept
    # global: compare channels across spaces on a common scale (each space's mean = 1)
    normed = {space: s / s.mean().clamp(min=1e-12) for space, s in scores.items()}
    if costs:
        mean_log = sum(math.log(costs[sp]) for sp in normed) / len(normed)
        # in logs, where the order is the same: cost**cost_power overflows for a large power
        normed = {sp: v.log() - cost_power * (math.log(costs[sp]) - mean_log) for sp, v in normed.items()}
    allv = torch.cat(list(normed.values()))
    total = max(1, round(rate * len(allv)))
    threshold = torch.topk(allv, total).values.min()
    for space, s in normed.items():
        k = _rounded(max(int((s >= threshold).sum()), min_channels_of(len(s))), len(s), multiple, min_channels)
        kept[space] = torch.topk(s, k).indices.sort().values
    return kept


def _slice_producer(t, leaf, out_idx, in_idx, factor):
    """conv / linear that make the space: outputs along dim 0, inputs along dim 1 (weights only);
    a linear after flatten sees each input channel as `factor` consecutive features."""
    t = t.index_select(0, out_idx)
    if leaf == "weight":
        if factor > 1:
            in_idx = (in_idx.unsqueeze(1) * factor + torch.arange(factor)).reshape(-1)
        t = t.index_select(1, in_idx)
    return t


def _slice_channels(t, leaf, out_idx, in_idx, factor):
    """bn and depthwise conv: one entry per channel of the space they carry (dim 0)."""
    return t.index_select(0, out_idx)


# One weight slicer per pruning role (compiler.ops): every op that produces a space stores
# [out, in, ...] weights, every weighted pass-through one value per channel (tested complete).
SLICERS = {PRODUCES: _slice_producer, WEIGHTED: _slice_channels}


def prune_model(model: Model, module: torch.nn.Module, kept: dict[int, torch.Tensor],
                spaces: Spaces | None = None, comment: str = "") -> tuple[Model, torch.nn.Module, str]:
    """The pruned spec text, its model and module with the kept weights copied in (exactly)."""
    spaces = spaces or analyse_channels(model.root)
    counts = {s: len(idx) for s, idx in kept.items()}
    old = state_tensors(module)
    new_state = {}

    def index(segments):
        """Kept channel indices of a tensor made of `segments`, each shifted by its offset."""
        parts, at = [], 0
        for s in segments:
            r = spaces.find(s)
            parts.append(kept.get(r, torch.arange(spaces.size[r])) + at)
            at += spaces.size[r]
        return torch.cat(parts)

    by_path = {u.node.path: u for u in spaces.usages}
    for name, tensor in old.items():
        owner, _, leaf = name.rpartition(".")
        u = by_path.get(owner)
        if u is None:
            new_state[name] = tensor.contiguous()
            continue
        new_state[name] = SLICERS[u.role](tensor, leaf, index(u.outs), index(u.ins), u.factor).contiguous()
    return rebuild(model, rewrite(model.root, spaces, counts), new_state, comment=comment,
                   label=f"{model.name}-pruned.spec", training=module.training)


def channel_multiple(round_to: int | None, latency_target: str, to_latency: bool) -> int:
    """Kept channel counts' multiple: `round_to` where given; else, pruning to a latency on ONNX Runtime,
    the channel block its table measured (its blocked layout runs only multiples of it; other widths run
    in plain layout, several times slower, where the table has no units to predict them from); else 1."""
    if round_to:
        return round_to
    if to_latency and latency_target.startswith("ort"):
        from compiler import latency

        return int(latency.cached_table(latency.canonical_target(latency_target)).fit.get("channel_block", 1))
    return 1


def predicted_latency_ms(model: Model, target: str) -> float:
    return predicted_latency(model, target).ms


def latency_costs(model: Model, spaces: Spaces, target: str, wanted) -> dict[int, float]:
    """Predicted milliseconds per channel of each `wanted` space on `target` (`cost: latency`); a space
    no unit touches costs a hundredth of the cheapest, since costs enter `choose` as logs."""
    prediction = predicted_latency(model, target)
    costs = spaces.per_channel([(unit.paths, ms) for unit, ms, _ in prediction.units])
    floor = min((c for c in costs.values() if c > 0), default=1.0) / 100
    return {s: max(costs.get(s, 0.0), floor) for s in wanted}


def shrink_to(model: Model, module: torch.nn.Module, scores, scope: str, metric: str, target: float,
              min_channels: int = 1, multiple: int = 1, latency_target: str = "ort-fp32", **choose_options) -> float:
    """The largest keep-rate whose pruned model has `metric` (params, macs, or latency predicted from
    this machine's table for `latency_target`) <= target (bisection on the analysis)."""
    spaces = analyse_channels(model.root)
    lo, hi = 0.0, 1.0

    def value(rate):
        counts = {s: len(i) for s, i in choose(scores, rate, scope, min_channels, multiple,
                                                **choose_options).items()}
        root = rewrite(model.root, spaces, counts)
        if metric == "latency":
            return predicted_latency_ms(dataclasses.replace(model, root=root), latency_target)
        return root.params if metric == "params" else root.total_macs

    if value(1.0) <= target:
        return 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if value(mid) <= target:
            lo = mid
        else:
            hi = mid
    return max(lo, 1e-3)
