"""`lowrank`: truncated-SVD factorization of linear layers and k x k convolutions."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from compiler.analysis import analyse, predicted_bytes

from ..files import atomic_write
from ..rewrite.lowrank import factorize_module
from .base import StepConfig, StepKind, StepResult, register
from .finetune import Finetune, finetune


class LowrankConfig(StepConfig):
    kind: str = "lowrank"
    rank_by: Literal["ratio", "energy"] = "energy"
    ratio: float = Field(0.5, gt=0, le=1)      # rank = ratio * full rank
    energy: float = Field(0.9, gt=0, le=1)     # smallest rank keeping this share of sum(sigma^2)
    layers: list[str] = ["*"]                  # fnmatch patterns of layer paths to consider
    skip: list[str] = []
    only_if_smaller: bool = True               # leave a layer whole when its factors would not be smaller
    finetune: Finetune | None = None


@register
class Lowrank(StepKind):
    kind = "lowrank"
    config = LowrankConfig
    trains = True
    reshaping = True
    finetunes = True

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
