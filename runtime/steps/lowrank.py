"""`lowrank`: truncated-SVD factorization of linear layers and k x k convolutions."""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Literal

import torch
from pydantic import Field

import compiler
from compiler.analysis import analyse, predicted_bytes
from compiler.emit import emit
from compiler.lowrank import candidates, factor_params, factorize

from ..files import atomic_write
from ..weights import load_into, state_tensors
from .base import StepConfig, StepKind, StepResult, register
from .finetune import Finetune, finetune, finetune_needs, set_finetune_epochs


class LowrankConfig(StepConfig):
    kind: str = "lowrank"
    rank_by: Literal["ratio", "energy"] = "energy"
    ratio: float = Field(0.5, gt=0, le=1)      # rank = ratio * full rank
    energy: float = Field(0.9, gt=0, le=1)     # smallest rank keeping this share of sum(sigma^2)
    layers: list[str] = ["*"]                  # fnmatch patterns of layer paths to consider
    skip: list[str] = []
    only_if_smaller: bool = True               # leave a layer whole when its factors would not be smaller
    finetune: Finetune | None = None


def factorize_module(model, module, cfg) -> tuple[object, torch.nn.Module, str, dict]:
    """(new model, its module with the factorized weights, spec text, chosen ranks)."""
    named = dict(module.named_modules())
    ranks, factors = {}, {}
    for node in candidates(model.root):
        if not any(fnmatchcase(node.path, p) for p in cfg.layers) or any(fnmatchcase(node.path, p) for p in cfg.skip):
            continue
        w = named[node.path].weight.detach().cpu().float()
        matrix = w.reshape(w.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        full = len(s)
        if cfg.rank_by == "ratio":
            rank = max(1, round(cfg.ratio * full))
        else:
            share = torch.cumsum(s ** 2, 0) / (s ** 2).sum().clamp(min=1e-30)
            rank = int((share < cfg.energy).sum().item()) + 1
        if cfg.only_if_smaller and factor_params(node, rank) >= node.params:
            continue  # factorizing would not make it smaller
        root_s = s[:rank].sqrt()
        factors[node.path] = ((root_s.unsqueeze(1) * vh[:rank]), (u[:, :rank] * root_s), w.shape)
        ranks[node.path] = rank
    new_root = factorize(model.root, ranks)
    text = emit(model, new_root, comment=f"low-rank factorized by nccompile ({cfg.rank_by})")
    new_model = compiler.compile_source(text, f"{model.name}-lowrank.spec", params=model.params,
                                        input_shape=model.input_shape)
    new_module = compiler.build_module(new_model)
    state = {}
    for name, t in state_tensors(module).items():
        owner, _, leaf = name.rpartition(".")
        if owner in factors:
            first, second, shape = factors[owner]
            if leaf == "weight":
                state[f"{owner}.0.weight"] = first.reshape(first.shape[0], *shape[1:]).contiguous()
                second = second if len(shape) == 2 else second.reshape(*second.shape, 1, 1)
                state[f"{owner}.1.weight"] = second.contiguous()
            else:
                state[f"{owner}.1.{leaf}"] = t
        else:
            state[name] = t
    load_into(new_module, state, "factorized weights")
    return new_model, new_module, text, ranks


@register
class Lowrank(StepKind):
    kind = "lowrank"
    config = LowrankConfig
    trains = True

    def needs(self, cfg):
        return finetune_needs(cfg)

    def produces(self, cfg):
        return [cfg.model]

    def reshapes(self, cfg):
        return True

    def set_epochs(self, raw, epochs):
        set_finetune_epochs(self.config, raw, epochs)

    def describe(self, cfg):
        how = f"energy {cfg.energy:g}" if cfg.rank_by == "energy" else f"ratio {cfg.ratio:g}"
        return f"factorize {cfg.model}'s convs and linears by truncated SVD ({how})"

    def run(self, cfg: LowrankConfig, ctx, key: str = "") -> StepResult:
        slot = ctx.models[cfg.model]
        module = slot.build(ctx.device, ctx.recipe.seed).eval()
        before = ctx.evaluate(module, "val").accuracy
        new_model, new_module, text, ranks = factorize_module(slot.model, module.cpu(), cfg)
        new_module = new_module.to(ctx.device)
        if cfg.finetune and cfg.finetune.epochs:
            finetune(ctx, cfg.finetune, new_module, ctx.run.step_dir(cfg.name) / "finetune", key,
                     f"{cfg.name} finetune")
        after = ctx.evaluate(new_module, "val").accuracy
        step_dir = ctx.run.step_dir(cfg.name)
        if ctx.is_main:
            atomic_write(step_dir / "lowrank.spec", text.encode())
        a, b = analyse(slot.model), analyse(new_model)
        ctx.log(f"{cfg.name}: {len(ranks)} layer(s) factorized; {a.params:,} -> {b.params:,} params, "
                f"{a.macs:,} -> {b.macs:,} MACs; val accuracy {before:.4f} -> {after:.4f}")
        path, _ = ctx.save(slot, new_module, cfg.name, model=new_model)
        return StepResult(model_file=path, spec_file=step_dir / "lowrank.spec",
                          files=[f"steps/{cfg.name}/lowrank.spec"],
                          metrics={"val_accuracy": after, "val_accuracy_before": before, "ranks": ranks,
                                   "params": b.params, "macs": b.macs,
                                   "file_bytes": predicted_bytes(new_model, "fp32")})
