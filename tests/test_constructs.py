"""The compact-CNN constructs: branches joined by concat / add / mul, split, shuffle, gates,
`in_channels`, and the layers of the newer families (layernorm, groupnorm, layerscale, droppath,
adaptive pooling, hardsigmoid). Counts are checked against the built module (parameters, every
module's output shape, FlopCounterMode's MACs); pruning, emitting and file bytes work through them."""
from __future__ import annotations

import pytest
import torch

import compiler
from compiler.emit import emit
from compiler.errors import SpecError
from compiler.ir import without_spans
from compiler.rewrite.channels import analyse_channels
from compiler.validate import validate
from runtime.rewrite.prune import choose, importance, prune_model
from runtime.weights import model_bytes

from .measure import measure, trained_like

EVERY_CONSTRUCT = """
block fire(squeeze: int, expand: int) {
    conv(squeeze, kernel=1) relu
    concat { conv(expand, kernel=1) relu } { conv(expand, kernel=3) relu }
}
block se(reduce: int = 4) {
    gate { gap conv(in_channels // reduce, kernel=1) relu conv(in_channels, kernel=1) hardsigmoid }
}
block shuffle_unit() {
    concat split { } { conv(in_channels // 2, kernel=1) bn relu dwconv(kernel=5) bn conv(in_channels // 2, kernel=1)
                       bn relu }
    shuffle(2)
}
model every(classes: int = 10) {
    input 3x32x32
    conv(16) bn relu
    fire(8, 16)
    se
    shuffle_unit
    residual { dwconv(kernel=7) layernorm conv(64, kernel=1) gelu conv(32, kernel=1) layerscale droppath(0.1) }
    groupnorm(4)
    concat split(8, 24) { conv(8, kernel=1) } { }
    add { } { conv(32, kernel=1) bn }
    mul { } { conv(32, kernel=1) sigmoid }
    adaptive_avgpool(2)
    flatten linear(classes)
}
"""


def _compile(text: str, **kw):
    return compiler.compile_source(text, "every.spec", **kw)


def _trained_like(model):
    return trained_like(compiler.build_module(model, seed=1))


def test_counts_agree_with_the_module_and_the_flop_counter():
    model = _compile(EVERY_CONSTRUCT)
    a = compiler.analyse(model)
    got = measure(compiler.build_module(model), model.input_shape)
    assert (got["params"], got["macs"], got["output"]) == (a.params, a.macs, (10,))
    nodes = {n.path: n for n in model.root.walk()}
    for path, shape in got["shapes"].items():
        if path in nodes:  # every module the spec made has the output shape the analysis gave it
            assert nodes[path].out_shape == shape, path
    assert nodes["3.2"].out_shape == (32, 32, 32)  # fire's concat: 16 + 16 channels
    assert nodes["4.0.1"].out_shape == (32, 1, 1)  # se's gate branch, broadcast over the input


def test_the_module_trains_and_droppath_is_identity_at_inference():
    model = _compile(EVERY_CONSTRUCT)
    module = compiler.build_module(model)
    x = torch.randn(4, 3, 32, 32)
    module.train()
    module(x).sum().backward()
    assert all(p.grad is not None for p in module.parameters())
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(x), module(x))


def test_yaml_form_is_the_same_ir():
    yaml_text = """
blocks:
  se:
    params: {reduce: {type: int, default: 4}}
    layers:
      - gate: [gap, {conv: {out: "in_channels // reduce", kernel: 1}}, relu, {conv: {out: in_channels, kernel: 1}},
               hardsigmoid]
model:
  name: m
  input: [3, 16, 16]
  layers:
    - conv: 16
    - se
    - concat: [[], [{conv: {out: 8, kernel: 1}}]]
      split: true
    - concat: [[{conv: {out: 4, kernel: 1}}], []]
      split: [4, 12]
    - shuffle: 2
    - add: [[], [{conv: {out: 16, kernel: 1}}]]
"""
    dsl_text = """
block se(reduce: int = 4) {
    gate { gap conv(in_channels // reduce, kernel=1) relu conv(in_channels, kernel=1) hardsigmoid }
}
model m {
    input 3x16x16
    conv(16) se
    concat split { } { conv(8, kernel=1) }
    concat split(4, 12) { conv(4, kernel=1) } { }
    shuffle(2)
    add { } { conv(16, kernel=1) }
}
"""
    from compiler.parse import parse_dsl, parse_yaml

    from_yaml, problems = parse_yaml(yaml_text, "m.yaml")
    assert not problems
    from_dsl = parse_dsl(dsl_text, "m.spec").model_copy(update={"path": "m.yaml"})
    assert without_spans(validate(from_yaml)) == without_spans(validate(from_dsl))  # arguments bound by name
    a = compiler.analyse(compiler.compile_source(yaml_text, "m.yaml", syntax="yaml"))
    b = compiler.analyse(compiler.compile_source(dsl_text, "m.spec"))
    assert (a.params, a.macs) == (b.params, b.macs)


def test_emitted_spec_roundtrips_every_construct():
    model = _compile(EVERY_CONSTRUCT)
    text = emit(model)
    assert "gate {" in text and "concat split(16, 16) {" in text and "concat split(8, 24) {" in text
    again = compiler.compile_source(text, "emitted.spec")
    shapes = [(n, t.shape) for n, t in model.root.state_tensors()]
    assert [(n, t.shape) for n, t in again.root.state_tensors()] == shapes
    assert compiler.analyse(again).macs == compiler.analyse(model).macs


def test_channel_coupling_through_joins():
    model = _compile("model m { input 3x8x8 conv(16) bn relu gate { gap conv(4, kernel=1) relu conv(16, kernel=1) "
                     "sigmoid } add { } { conv(16, kernel=1) bn } concat { conv(8, kernel=1) } { conv(8, kernel=1) } "
                     "concat split { conv(8, kernel=1) } { } gap flatten linear(10) }")
    spaces = analyse_channels(model.root)
    out = {u.node.path: spaces.find(u.out) for u in spaces.usages}
    # a gate's last conv makes the channels it multiplies, an add branch those it adds: one space
    assert out["0"] == out["3.1.3"] == out["4.1.0"] and not spaces.frozen[out["0"]]
    # the squeeze inside the gate is a space of its own, free to prune
    assert out["3.1.1"] not in (out["0"],) and not spaces.frozen[out["3.1.1"]]
    # a concatenation lists its branches' spaces; a split on their boundary hands them out again
    assert not any(spaces.frozen[out[p]] for p in ("5.0.0", "5.1.0", "6.0.0"))
    assert [[spaces.find(s) for s in segs] for segs in spaces.splits["6"]] == [[out["5.0.0"]], [out["5.1.0"]]]
    head = next(u for u in spaces.usages if u.node.path == "9")
    assert [spaces.find(s) for s in head.ins] == [out["6.0.0"], out["5.1.0"]]
    # a split that cuts a segment ties its channels
    cut = analyse_channels(_compile("model m { input 3x8x8 conv(8) concat split(3, 5) { } { } gap flatten "
                                    "linear(2) }").root)
    assert all(cut.frozen[cut.find(u.outs[0])] for u in cut.usages if u.node.path == "0")


@pytest.mark.parametrize("method", ["bn", "l1"])
def test_rate_one_keeps_the_model_exactly(method):
    model = _compile(EVERY_CONSTRUCT)
    module = _trained_like(model)
    spaces = analyse_channels(model.root)
    _, new_module, _ = prune_model(model, module, choose(importance(module, spaces, method), 1.0, "layer"), spaces)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (new_module.eval()(x) - module(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("rate", [0.75, 0.5])
def test_pruned_model_runs_matches_its_spec_and_shrinks(rate):
    model = _compile(EVERY_CONSTRUCT)
    module = _trained_like(model)
    spaces = analyse_channels(model.root)
    new_model, new_module, text = prune_model(model, module, choose(importance(module, spaces, "l1"), rate, "layer"),
                                              spaces)
    recompiled = compiler.compile_source(text, "pruned.spec")
    a = compiler.analyse(recompiled)
    got = measure(new_module, (3, 32, 32))
    assert got["params"] == a.params < compiler.analyse(model).params and got["macs"] == a.macs
    assert got["output"] == (10,)


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int8-channel", "int4", "int2"])
def test_every_weight_format_is_predicted_exactly(fmt):
    model = _compile(EVERY_CONSTRUCT)
    module = _trained_like(model)
    assert len(model_bytes(module, model, fmt)) == compiler.predicted_bytes(model, fmt)


@pytest.mark.parametrize("body, fragment", [
    ("conv(8) concat { conv(4) } { conv(4, stride=2) }",
     "concat: branch 0 gives 4x8x8 but branch 1 gives 4x4x4; concatenation needs the same size except in channels"),
    ("conv(8) add { } { conv(4) }", "add: branch 0 gives 8x8x8 but branch 1 gives 4x8x8; addition needs the same"),
    ("conv(8) mul { } { gap conv(4, kernel=1) }", "multiplication needs the same shapes, or Cx1x1 with the same"),
    ("conv(8) gate { gap conv(4, kernel=1) }", "gate: branch 0 gives 8x8x8 but branch 1 gives 4x1x1"),
    ("conv(8) concat split(3, 4) { } { }", "split(3, 4) gives 7 channels but the input has 8"),
    ("conv(9) concat split { } { }", "split: 9 input channels do not divide into 2 equal shares"),
    ("conv(8) concat split(4, 2, 2) { } { }", "split gives 3 channel count(s) for 2 branches"),
    ("conv(8) concat split(a=4, b=4) { } { }", "split takes channel counts, not named arguments"),
    ("conv(8) concat split(0, 8) { } { }", "a split size must be a positive int, got 0"),
    ("conv(9) shuffle(2)", "shuffle: 2 groups do not divide 9 channels"),
    ("conv(9) groupnorm(2)", "groupnorm: 2 groups do not divide 9 channels"),
    ("conv(8) droppath(1.5)", "dropout probability must be in [0, 1)"),
    ("conv(8) adaptive_avgpool(0)", "`size` must be at least 1"),
    ("conv(8) layernorm(eps=0.0)", "eps must be positive"),
])
def test_construct_errors_name_the_place_and_the_shapes(body, fragment):
    with pytest.raises(SpecError) as err:
        _compile(f"model m {{\n    input 3x8x8\n    {body}\n}}\n")
    text = str(err.value)
    assert fragment in text and "every.spec:3:" in text, text


def test_in_channels_cannot_be_declared_or_used_outside_blocks():
    with pytest.raises(SpecError, match="`in_channels` is the channel count a block receives"):
        _compile("block b(in_channels: int) { relu }\nmodel m { input 3x8x8 b(1) }")
    with pytest.raises(SpecError, match="unknown name `in_channels`"):
        _compile("model m { input 3x8x8 conv(in_channels) }")


def test_blocks_infer_their_input_channels():
    """A MobileNetV2 inverted residual needs no input count: `in_channels` is what the block receives."""
    text = """
block inverted(out: int, expand: int = 6, stride: int = 1) {
    pwconv(in_channels * expand) bn relu6
    dwconv(stride=stride) bn relu6
    pwconv(out) bn
}
model m { input 3x16x16 conv(16) inverted(24, stride=2) residual { inverted(24) } }
"""
    model = _compile(text)
    nodes = {n.path: n for n in model.root.walk()}
    assert nodes["1.0"].out_shape == (96, 16, 16) and nodes["2.body.0.0"].out_shape == (144, 8, 8)
    assert measure(compiler.build_module(model), (3, 16, 16))["params"] == compiler.analyse(model).params


@pytest.mark.parametrize("layers, fragment", [
    ("[{concat: [[relu]]}]", "`concat` needs at least two branches"),
    ("[{relu: null, split: true}]", "`split` does not apply to `relu`"),
    ("[{add: [[], []], project: true}]", "`project` does not apply to `add`"),
    ("[{concat: [[], []], split: maybe}]", "`split` must be true or false"),
    ("[{concat: relu}]", "the branches of `concat` must be a list"),
])
def test_yaml_construct_errors(layers, fragment):
    text = f"model:\n  name: m\n  input: [3, 8, 8]\n  layers: {layers}\n"
    with pytest.raises(SpecError) as err:
        compiler.compile_source(text, "m.yaml", syntax="yaml")
    assert fragment in str(err.value) and "m.yaml:4:" in str(err.value), str(err.value)


def test_lowrank_factorizes_convs_inside_branches():
    from runtime.rewrite.lowrank import factorize_module
    from runtime.steps.lowrank import LowrankConfig

    model = _compile(EVERY_CONSTRUCT)
    module = _trained_like(model)
    exact_model, exact, _, ranks = factorize_module(model, module, LowrankConfig(
        name="l", rank_by="ratio", ratio=1.0, only_if_smaller=False))
    assert "3.2.1.0" in ranks  # fire's 3x3 expand conv, inside a concat branch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (exact.eval()(x) - module(x)).abs().max().item() < 1e-4
    small_model, small, text, _ = factorize_module(model, module, LowrankConfig(name="l", rank_by="ratio", ratio=0.25))
    again = compiler.analyse(compiler.compile_source(text, "lowrank.spec"))
    got = measure(small, (3, 32, 32))
    assert got["params"] == again.params < compiler.analyse(model).params and got["macs"] == again.macs


def test_in_place_activations_change_nothing_but_memory():
    """Activations run in place only where nothing else reads their input; outputs and gradients
    equal those of the same module with every activation out of place, in training too."""
    import copy

    text = ("model m { input 3x8x8 conv(8) relu relu6 residual { relu conv(8) bn silu } hardswish "
            "add { relu } { } relu gate { gap conv(8, kernel=1) relu conv(8, kernel=1) sigmoid } relu "
            "concat { relu6 } { conv(4) } relu identity relu gap flatten linear(3) relu }")
    model = _compile(text)
    module = compiler.build_module(model).train()
    in_place = {n for n, m in module.named_modules() if getattr(m, "inplace", False)}
    # after conv, residual, add, gate (mul), concat and linear; not after another activation, not first
    # in a body, not after identity (which returns its input)
    assert in_place == {"1", "3.body.3", "4", "6", "7.1.2", "8", "10", "16"}, in_place
    plain = copy.deepcopy(module)
    for m in plain.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    x = torch.randn(4, 3, 8, 8)
    outs = []
    for mod in (module, plain):
        y = mod(x.clone().requires_grad_())
        y.square().sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in mod.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


@pytest.mark.slow
def test_torchs_onnx_exporter_takes_every_construct(tmp_path):
    """The `float` export form (torch's exporter) takes the joins and the shuffle too; nccompile's own
    writer is checked on the same spec in tests/test_deploy.py."""
    import onnx

    from runtime.deploy.onnx_export import export_float

    model = _compile(EVERY_CONSTRUCT)
    module = _trained_like(model)
    export_float(module, model.input_shape, tmp_path / "m.onnx", 17)
    assert onnx.load(str(tmp_path / "m.onnx")).graph.output[0].name == "logits"


def test_reordering_every_prunable_space_keeps_the_outputs():
    model = _compile(EVERY_CONSTRUCT)
    module = _trained_like(model)
    spaces = analyse_channels(model.root)
    g = torch.Generator().manual_seed(0)
    kept = {s: torch.randperm(spaces.size[s], generator=g) for s in spaces.prunable()}
    _, new_module, _ = prune_model(model, module, kept, spaces)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (new_module.eval()(x) - module(x)).abs().max().item() < 1e-4
