"""Every layer kind has one complete op record, a builder and, where it owns per-channel weights, a
slicer; a missing rule is an error; the README's layer table matches the records."""
from __future__ import annotations

import re

import pytest

import compiler
from compiler.build import ACTIVATIONS, BUILDERS
from compiler.ops import LAYERS, OPS, PASSES, PRODUCES, REQUIRED, ROLES, WEIGHTED, record
from compiler.ops.activation import NAMES
from compiler.rewrite.channels import analyse_channels
from compiler.tree import Node
from runtime.rewrite.prune import SLICERS

from .conftest import ROOT

# One spec that uses every layer kind of the language (dwconv both depthwise and with a multiplier).
EVERY_LAYER = """
model every(classes: int = 4) {
    input 3x16x16
    conv(8) bn relu relu6 gelu silu hardswish hardsigmoid sigmoid tanh leaky_relu(0.1)
    dwconv(3) pwconv(8) conv(8, groups=2) dwconv(3, multiplier=2) maxpool(2) avgpool(2) identity dropout(0.1)
    layernorm groupnorm(4) layerscale droppath(0.1) shuffle(2) adaptive_avgpool(4)
    gap flatten linear(16) bn relu layernorm layerscale linear(classes)
}
"""


def test_every_layer_kind_has_a_record_a_builder_and_its_slicers(tmp_path):
    spec = tmp_path / "every.spec"
    spec.write_text(EVERY_LAYER)
    model = compiler.compile_spec(spec)
    used = {leaf.layer for leaf in model.root.leaves()}
    assert used == set(LAYERS), f"EVERY_LAYER misses {set(LAYERS) - used}"
    module = compiler.build_module(model)  # every builder runs
    assert module is not None
    for leaf in model.root.leaves():
        rec = record(leaf.op)
        role = rec.role(leaf.attrs)
        assert role in ROLES
        assert leaf.op in BUILDERS
        if role in (PRODUCES, WEIGHTED) and rec.tensors(leaf.attrs):
            assert role in SLICERS, f"{leaf.path}: no slicer for {role}"
            assert rec.rechannel is not None
        if role == PASSES:
            assert not rec.tensors(leaf.attrs), f"{leaf.op} passes channels but owns weights"
    for kind in LAYERS.values():
        assert kind.op in OPS
    assert set(NAMES) == set(ACTIVATIONS)


def test_an_op_without_a_record_is_an_error_not_a_pass_through():
    mystery = Node("0", "0", "mystery", "mystery", (3, 8, 8), (3, 8, 8))
    root = Node("", "", "m", "seq", (3, 8, 8), (3, 8, 8), children=[mystery])
    with pytest.raises(ValueError, match="no op record for `mystery`"):
        analyse_channels(root)


def test_readme_layer_table_matches_the_records():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("**Layers**"):]
    rows = []
    for line in table.splitlines()[1:]:
        if line.startswith("| `"):
            rows.append(line)
        elif rows and not line.startswith("|"):
            break
    documented = set()
    for row in rows:
        first = row.split("|")[1]
        names = re.findall(r"`([a-z_0-9]+)", first)
        documented |= set(names)
        for name in names:
            kind = LAYERS.get(name)
            assert kind is not None, f"README documents `{name}`, which is no layer"
            for arg in kind.args:
                listed = re.search(rf"`{arg.name}(=|`|\))|\({arg.name}=", row)
                assert listed, f"README row of `{name}` lacks `{arg.name}`"
                if arg.default not in (REQUIRED, None) and not isinstance(arg.default, bool):
                    shown = re.search(rf"{arg.name}=([0-9.e-]+)", row)
                    assert shown and float(shown.group(1)) == float(arg.default), (name, arg.name)
    assert documented == set(LAYERS), f"README lacks {set(LAYERS) - documented}"


def _every_layer(tmp_path):
    spec = tmp_path / "every.spec"
    spec.write_text(EVERY_LAYER)
    return compiler.compile_spec(spec)


def _leaves_by_op(model) -> dict[str, list]:
    out: dict[str, list] = {}
    for leaf in model.root.leaves():
        out.setdefault(leaf.op, []).append(leaf)
    return out


def test_fresh_ops_let_an_in_place_activation_overwrite_their_output(tmp_path):
    """`fresh`: the op returns a new tensor its backward does not keep, so ReLU(inplace) after it gives the
    same values and gradients as an out-of-place ReLU. An op that is not fresh is left alone by build."""
    import torch

    model = _every_layer(tmp_path)
    by_op = _leaves_by_op(model)
    fresh = [op for op in OPS if OPS[op].fresh]
    assert {"conv", "linear", "bn", "maxpool", "gap"} <= set(fresh)
    for op in fresh:
        leaf = by_op[op][0]
        torch.manual_seed(0)
        layer = BUILDERS[op](leaf.attrs).train()
        x = torch.randn(2, *leaf.in_shape)
        results = []
        for inplace in (False, True):
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(1)
            out = torch.nn.ReLU(inplace=inplace)(layer(xi))
            out.square().sum().backward()
            results.append((out.detach(), xi.grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1]), op
    module = compiler.build_module(model)
    for leaf in model.root.leaves():  # an activation straight after a non-fresh op never runs in place
        parent = module.get_submodule(leaf.path.rpartition(".")[0]) if "." in leaf.path else module
        names = list(parent._modules)
        name = leaf.path.rpartition(".")[2]
        nxt = names.index(name) + 1 if name in names else len(names)
        if nxt < len(names) and getattr(parent._modules[names[nxt]], "inplace", False):
            assert OPS[leaf.op].fresh, f"{leaf.path}: an in-place activation after a {leaf.op}"


def test_folds_bn_ops_absorb_the_batchnorm_after_them_exactly(tmp_path):
    """`folds_bn`: every (layer, BatchNorm) pair found has a folding op first, each folding op of the spec
    forms a pair, and the folded module computes what the unfolded one does in eval mode."""
    import torch

    from compiler.fileformat import fold_pairs
    from runtime.quant.fold import fold_batchnorm

    model = _every_layer(tmp_path)
    pairs = fold_pairs(model.root)
    assert {a.op for a, _ in pairs} == {op for op in OPS if OPS[op].folds_bn} == {"conv"}
    module = compiler.build_module(model).eval()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2)
        x = torch.randn(2, *model.input_shape)
        before = module(x)
        after = fold_batchnorm(module, model)(x)
    assert torch.allclose(before, after, atol=1e-4)


def test_factor_ops_split_into_parts_with_exact_counts(tmp_path):
    """`factor`: the two parts resolve through their records, keep the layer's input and output shapes,
    and factor_params counts exactly the parameters of the factorized spec."""
    from compiler.analysis import analyse
    from compiler.rewrite.lowrank import candidates, factor_params, factorize
    from compiler.rewrite.respec import respec

    model = _every_layer(tmp_path)
    found = candidates(model.root)
    assert {n.op for n in found} == {op for op in OPS if OPS[op].factor} == {"conv", "linear"}
    for node in found:
        rank = 2
        root = factorize(model.root, {node.path: rank})
        part = next(n for n in root.walk() if n.path == node.path)
        assert part.layer == "lowrank" and part.children[-1].out_shape == node.out_shape
        assert root.params - model.root.params == factor_params(node, rank) - node.params
        _, rewritten = respec(model, root, label="factorized.spec")  # the parts emit and compile
        assert analyse(rewritten).params == root.params
    grouped = [n for n in model.root.leaves() if n.op == "conv" and n.attrs["groups"] > 1]
    assert grouped and not set(map(id, grouped)) & set(map(id, found))  # grouped convs stay whole


def test_channel_scale_names_one_value_per_channel(tmp_path):
    """`channel_scale`: the tensor that ranks channels for pruning is one of the op's own, one per channel."""
    model = _every_layer(tmp_path)
    scaled = set()
    for leaf in model.root.leaves():
        name = OPS[leaf.op].channel_scale(leaf.attrs)
        if name is None:
            continue
        scaled.add(leaf.op)
        shapes = {t.name: t.shape for t in OPS[leaf.op].tensors(leaf.attrs)}
        assert shapes.get(name) == (leaf.out_shape[0],), (leaf.path, name, shapes)
    assert scaled == {"bn"}
    assert OPS["bn"].channel_scale({"affine": False}) is None
