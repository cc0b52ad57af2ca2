"""Every layer kind has one complete op record, a builder and, where it owns per-channel weights, a
slicer; a missing rule is an error; the README's layer table matches the records."""
from __future__ import annotations

import re

import pytest

import compiler
from compiler.build import ACTIVATIONS, BUILDERS
from compiler.channels import analyse_channels
from compiler.ops import LAYERS, OPS, PASSES, PRODUCES, REQUIRED, ROLES, WEIGHTED, record
from compiler.ops.activation import NAMES
from compiler.tree import Node
from runtime.prune import SLICERS

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
