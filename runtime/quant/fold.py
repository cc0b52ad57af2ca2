"""BatchNorm folding: each BatchNorm that follows a conv (compiler.fileformat.fold_pairs) merged
into that conv, exactly in eval mode, for `fold_bn` files and integer kernels."""
from __future__ import annotations

import torch

from compiler.fileformat import fold_pairs
from compiler.tree import Model


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module:
    return module.get_submodule(path) if path else module


def _set(module: torch.nn.Module, path: str, child: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent), name, child)


def fold_structure(module: torch.nn.Module, model: Model) -> list[str]:
    """Turn every (layer, bn) pair into a layer with bias and an Identity; returns the BN paths."""
    folded = []
    for conv_node, bn_node in fold_pairs(model.root):
        conv = _get(module, conv_node.path)
        if conv.bias is None:
            conv.bias = torch.nn.Parameter(torch.zeros(conv.weight.shape[0], device=conv.weight.device))
        _set(module, bn_node.path, torch.nn.Identity())
        folded.append(bn_node.path)
    return folded


@torch.no_grad()
def fold_batchnorm(module: torch.nn.Module, model: Model) -> torch.nn.Module:
    """Fold each BN into the layer before it (compiler.fileformat.fold_pairs), exact in eval mode: the
    layer's [out, ...] weight scaled per output channel, its bias shifted; returns the module."""
    for conv_node, bn_node in fold_pairs(model.root):
        conv, bn = _get(module, conv_node.path), _get(module, bn_node.path)
        inv_std = 1 / torch.sqrt(bn.running_var + bn.eps)
        scale = bn.weight * inv_std if bn.affine else inv_std
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.dim() - 1)))
        new_bias = bias * scale + shift
        conv.bias = torch.nn.Parameter(new_bias.detach().clone())
        _set(module, bn_node.path, torch.nn.Identity())
    return module
