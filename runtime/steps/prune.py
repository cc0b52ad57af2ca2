"""`prune`: structured channel pruning, iterated with fine-tuning, optionally swept over rates."""
from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import io
from typing import Literal

import torch
from pydantic import Field, model_validator

from compiler.analysis import analyse, predicted_bytes
from compiler.rewrite.channels import analyse_channels, rewrite

from ..deploy.latency import latency_ms
from ..files import atomic_write
from ..profile.missing import measure_missing
from ..rewrite.prune import (
    channel_multiple,
    choose,
    importance,
    latency_costs,
    predicted_latency_ms,
    prune_model,
    shrink_to,
)
from ..rundir import digest
from .base import StepConfig, StepKind, StepResult, register
from .finetune import Finetune, finetune, finetune_loss


class PruneConfig(StepConfig):
    kind: str = "prune"
    importance: Literal["bn", "l1", "l2", "random"] = "bn"
    scope: Literal["layer", "global"] = "layer"
    rate: float = Field(0.9, gt=0, le=1)       # fraction of channels kept per iteration
    rates: list[float] | None = None            # a sweep: each rate from the same start
    iterations: int = Field(1, ge=1)
    target_params: int | None = Field(None, ge=1)  # instead of a rate: prune until params <= N ...
    target_macs: int | None = Field(None, ge=1)    # ... or MACs <= N (spread over the iterations)
    target_latency_ms: float | None = Field(None, gt=0)  # ... or predicted latency <= N ms (nccompile profile)
    latency_target: Literal["ort-fp32", "ort-weights", "ort-int8", "torch-fp32"] = "ort-fp32"  # the table read
    min_channels: int = Field(1, ge=1)
    round_to: int | None = Field(None, ge=1)      # kept channel counts rounded to a multiple (e.g. 8); unset:
    # 1, or pruning to a latency on ONNX Runtime, its blocked layout's channel block (channel_multiple)
    cost: Literal["none", "activations", "latency"] = "none"  # global scope: prune the costly channels harder
    # (activations: elements written per channel; latency: predicted ms per channel, from the table)
    cost_power: float = Field(0.5, ge=0)           # importance / cost**cost_power
    min_rate: float = Field(0.0, ge=0, le=1)       # keep at least this fraction of every layer
    finetune: Finetune | None = Finetune()
    latency: bool = True                          # CPU latency per image after every iteration

    @model_validator(mode="after")
    def _one_goal(self):
        if sum(1 for t in (self.target_params, self.target_macs, self.target_latency_ms) if t) > 1:
            raise ValueError("give one of target_params, target_macs and target_latency_ms")
        if self.rates is not None and (self.target_params or self.target_macs or self.target_latency_ms):
            raise ValueError("a sweep (`rates`) and a target do not combine")
        if self.rates is not None and not all(0 < r <= 1 for r in self.rates):
            raise ValueError("every rate must be in (0, 1]")
        if self.cost != "none" and self.scope != "global":
            raise ValueError("`cost` ranks channels across layers: it needs `scope: global`")
        return self


def _goal(cfg: PruneConfig, model) -> tuple[str, float, float] | None:
    """(metric, the step's target, the model's value now) for a step with a target; None for a rate."""
    if cfg.target_latency_ms:
        return "latency", cfg.target_latency_ms, predicted_latency_ms(model, cfg.latency_target)
    if cfg.target_params or cfg.target_macs:
        facts = analyse(model)
        return ("params", cfg.target_params, facts.params) if cfg.target_params else ("macs", cfg.target_macs,
                                                                                       facts.macs)
    return None


MEASURE_ROUNDS = 3  # choose, time the chosen widths' units the table lacks, choose again: at most this often


def settle(model, spaces, target: str, pick) -> tuple[float, dict, int]:
    """`pick()` -> (rate, kept) chosen on the predicted latency; while the kept widths have units the table
    lacks (MEASURE_ROUNDS at most), time them (measure_missing) and pick again. Returns (rate, kept, the
    units timed)."""
    rate, kept = pick()
    timed = 0
    for _ in range(MEASURE_ROUNDS):
        chosen = dataclasses.replace(model, root=rewrite(model.root, spaces, {s: len(i) for s, i in kept.items()}))
        found = measure_missing(chosen, target)
        if not found:
            break
        timed += found
        rate, kept = pick()
    return rate, kept, timed


@register
class Prune(StepKind):
    kind = "prune"
    config = PruneConfig
    trains = True
    reshaping = True
    finetunes = True

    def check(self, cfg, models, listing) -> list[str]:
        """A round_to no prunable layer can honour would silently prune nothing."""
        if cfg.model not in models:
            return []
        spaces = analyse_channels(models[cfg.model].model.root)
        sizes = [spaces.size[s] for s in spaces.prunable()]
        if not sizes:
            return [f"step `{cfg.name}`: {cfg.model} has no prunable channels (its spec is a torchvision model or "
                    "all its channels are tied)"]
        if (cfg.round_to or 1) >= max(sizes):
            return [f"step `{cfg.name}`: round_to={cfg.round_to} is not below the widest prunable layer "
                    f"({max(sizes)} channels), so nothing would be pruned"]
        return []

    def describe(self, cfg):
        goal = (f"params <= {cfg.target_params:,}" if cfg.target_params else f"MACs <= {cfg.target_macs:,}"
                if cfg.target_macs else f"latency({cfg.latency_target}) <= {cfg.target_latency_ms:g} ms"
                if cfg.target_latency_ms else f"keep {', '.join(map(str, cfg.rates))} (sweep)" if cfg.rates
                else f"keep {cfg.rate:g}")
        tune = (f", {cfg.finetune.kind} {cfg.finetune.epochs} epoch(s) after each" if cfg.finetune and
                cfg.finetune.epochs else "")
        return (f"prune {cfg.model} by {cfg.importance} ({cfg.scope}): {goal}, {cfg.iterations} iteration(s)"
                f"{tune}")

    # one measured point of the trade-off
    def _point(self, cfg, ctx, model, module, label, iteration) -> dict:
        data = ctx.data()
        a = analyse(model)
        acc = ctx.evaluate(module, "val").accuracy
        point = {"run": label, "iteration": iteration, "params": a.params, "macs": a.macs,
                 "file_bytes": predicted_bytes(model, "fp32"), "val_accuracy": acc}
        if cfg.cost == "latency" or cfg.target_latency_ms:
            point["predicted_latency_ms"] = predicted_latency_ms(model, cfg.latency_target)
        if cfg.latency:
            # CPU latency of a CPU copy: the model being pruned stays where it trains
            one = ctx.pipeline("eval")(data.val.images[:1])
            cpu = copy.deepcopy(module).cpu().float().to(memory_format=torch.contiguous_format)
            point["latency_ms"] = latency_ms(cpu, one, runs=20)
        ctx.log(f"{cfg.name} [{label}] iteration {iteration}: {a.params:,} params, {a.macs:,} MACs, "
                f"val accuracy {acc:.4f}" + (f", {point['latency_ms']:.2f} ms/image" if cfg.latency else ""))
        return point

    def _run_one(self, cfg, ctx, key, rate, label, model, module, loss_factory
                 ) -> tuple[list[dict], object, object, str]:
        points = [self._point(cfg, ctx, model, module, label, 0)]
        text = model.source
        to_latency = cfg.cost == "latency" or bool(cfg.target_latency_ms)
        multiple = channel_multiple(cfg.round_to, cfg.latency_target, to_latency)
        if multiple > 1 and not cfg.round_to:
            ctx.log(f"{cfg.name} [{label}]: channel counts kept at multiples of {multiple}, the channel block of "
                    f"{cfg.latency_target}'s blocked layout (set round_to to choose)")
        for it in range(1, cfg.iterations + 1):
            spaces = analyse_channels(model.root)
            scores = importance(module, spaces, cfg.importance, ctx.recipe.seed + it)
            pick = functools.partial(self._choose, cfg, model, module, spaces, scores, rate, multiple, it)
            if to_latency:  # the chosen widths' units the table lacks: timed, then chosen again
                step_rate, kept, timed = settle(model, spaces, cfg.latency_target, pick)
                if timed:
                    ctx.log(f"{cfg.name} [{label}] iteration {it}: timed {timed} unit(s) of the chosen widths that "
                            f"the {cfg.latency_target} table lacks, on this machine (kept in memory)")
            else:
                step_rate, kept = pick()
            if all(len(kept[s]) == spaces.size[s] for s in kept):  # more iterations would only fine-tune again
                ctx.log(f"{cfg.name} [{label}] iteration {it}: nothing left to prune (every layer at its minimum "
                        f"or the target reached); stopping after {it - 1} of {cfg.iterations} iteration(s)")
                break
            model, module, text = prune_model(model, module, kept, spaces,
                                              comment=f"pruned by nccompile step {cfg.name} ({label}), "
                                                      f"iteration {it}, keep rate {step_rate:.4f}")
            module = module.to(ctx.device)
            if loss_factory is not None:
                slug = label.replace(" ", "")
                finetune(ctx, cfg.finetune, module, ctx.run.step_dir(cfg.name) / f"{slug}-iter{it}",
                         digest(key, label, it), f"{cfg.name} [{label}] finetune {it}", loss_factory)
            point = self._point(cfg, ctx, model, module, label, it)
            point["rate"] = step_rate
            points.append(point)
        self._say_if_short(cfg, ctx, model, label, multiple)
        return points, model, module, text

    @staticmethod
    def _choose(cfg: PruneConfig, model, module, spaces, scores, rate: float, multiple: int, it: int):
        """(keep-rate, kept channels) of one iteration: the rate given, or the one that meets this
        iteration's share of the target (shrink_to), weighed by the step's cost."""
        options = {"min_rate": cfg.min_rate}
        if cfg.cost == "activations":
            options.update(costs={s: spaces.activations_per_channel(s) for s in scores}, cost_power=cfg.cost_power)
        elif cfg.cost == "latency":
            options.update(costs=latency_costs(model, spaces, cfg.latency_target, scores), cost_power=cfg.cost_power)
        step_rate = rate
        if aim := _goal(cfg, model):
            metric, target, now = aim
            remaining = cfg.iterations - it + 1
            goal = now * (target / now) ** (1 / remaining) if now > target else now
            goal = goal if metric == "latency" else int(goal)
            step_rate = shrink_to(model, module, scores, cfg.scope, metric, goal, cfg.min_channels, multiple,
                                  latency_target=cfg.latency_target, **options)
        return step_rate, choose(scores, step_rate, cfg.scope, cfg.min_channels, multiple, **options)

    @staticmethod
    def _say_if_short(cfg: PruneConfig, ctx, model, label: str, multiple: int) -> None:
        """Say so when the pruned model is still over its target: every layer at its minimum (min_channels,
        whole multiples of the channel block) cannot go lower."""
        goal = _goal(cfg, model)
        if goal and goal[2] > goal[1] * 1.001:
            metric, target, now = goal
            name = "target_latency_ms" if metric == "latency" else f"target_{metric}"
            ctx.log(f"{cfg.name} [{label}]: {name} {target:g} not reached: the pruned model has {now:g} "
                    f"(every layer at its minimum: min_channels {cfg.min_channels}, multiples of {multiple}; "
                    f"lower them for a smaller model, or set a target within reach)")

    def run(self, cfg: PruneConfig, ctx, key: str = "") -> StepResult:
        slot = ctx.models[cfg.model]
        step_dir = ctx.run.step_dir(cfg.name)
        runs = [(r, f"rate {r:g}") for r in cfg.rates] if cfg.rates else [(cfg.rate, "prune")]
        curves, final = [], None
        # one teacher (and its cached logits) for every rate and iteration of the step
        loss_factory = finetune_loss(cfg.finetune, ctx) if cfg.finetune and cfg.finetune.epochs else None
        for rate, label in runs:
            torch.manual_seed(ctx.recipe.seed)
            start = slot.build(ctx.device, ctx.recipe.seed)
            points, model, module, text = self._run_one(cfg, ctx, key, rate, label, slot.model, start, loss_factory)
            curves += points
            final = (model, module, text)
        model, module, text = final
        files = []
        if ctx.is_main:
            atomic_write(step_dir / "pruned.spec", text.encode())
            files.append(f"steps/{cfg.name}/pruned.spec")
            self._write_curve(curves, step_dir, cfg)
            files += [f"steps/{cfg.name}/pruning_curve.csv", f"steps/{cfg.name}/pruning_curve.png"]
        path, _ = ctx.save(slot, module, cfg.name, model=model)  # the runner switches models from the result
        last = curves[-1]
        return StepResult(model_file=path, spec_file=step_dir / "pruned.spec", files=files,
                          metrics={"val_accuracy": last["val_accuracy"], "params": last["params"],
                                   "macs": last["macs"], "points": curves})

    @staticmethod
    def _write_curve(points, step_dir, cfg) -> None:
        from ..plots import pruning_curve

        buf = io.StringIO()
        fields = ["run", "iteration", "rate", "params", "macs", "file_bytes", "val_accuracy", "latency_ms"]
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for p in points:
            writer.writerow({k: p.get(k, "") for k in fields})
        atomic_write(step_dir / "pruning_curve.csv", buf.getvalue().encode())
        pruning_curve(points, step_dir / "pruning_curve.png", f"{cfg.model}: {cfg.importance} pruning")

