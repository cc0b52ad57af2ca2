"""Low-rank factorization of a module: truncated SVD of each chosen layer's weight, the factors
carried into the module of the factorized spec (compiler.rewrite.lowrank)."""
from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from compiler.rewrite.lowrank import candidates, factor_params, factorize

from ..weights import state_tensors
from .rebuild import rebuild


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
    new_model, new_module, text = rebuild(model, factorize(model.root, ranks), state,
                                          comment=f"low-rank factorized by nccompile ({cfg.rank_by})",
                                          label=f"{model.name}-lowrank.spec")
    return new_model, new_module, text, ranks
