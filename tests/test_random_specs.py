"""Randomly generated valid specs: analysis (no torch) == the built module, layer by layer."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compiler
from compiler.fileformat import weight_tensors

from .measure import measure

ACTS = ["relu", "relu6", "gelu", "silu", "hardswish", "sigmoid", "tanh", "leaky_relu(0.1)"]


@st.composite
def specs(draw):
    width_mult = draw(st.sampled_from([None, 0.5, 0.75, 1.5]))
    round_to = draw(st.sampled_from([1, 4, 8]))
    c, h, w = draw(st.integers(1, 4)), draw(st.integers(4, 16)), draw(st.integers(4, 16))
    shape = f"{c}x{h}x{w}"
    lines = []
    flat = False
    for _ in range(draw(st.integers(1, 8))):
        if flat:
            lines.append(draw(st.sampled_from(["bn", "dropout(0.1)", "linear(7)", "relu", "identity"])))
            continue
        kind = draw(st.sampled_from(["conv", "dwconv", "pwconv", "bn", "act", "pool", "residual", "block",
                                     "repeat", "group", "concat", "gate", "add", "norm"]))
        if kind == "conv":
            k, s = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 2]))
            out = draw(st.integers(1, 12))
            groups = ""
            if width_mult is None:
                g = draw(st.sampled_from([1, 2, 4]))
                groups = f", groups={g}"
                out = out * g
                lines.append(f"conv({out}, kernel={k}, stride={s}, bias={draw(st.booleans()) and 'true' or 'false'}"
                             f"{groups if c % g == 0 else ''})")
                c = out
            else:  # channels are scaled: no groups, `c` is no longer tracked
                lines.append(f"conv({out}, kernel={k}, stride={s})")
        elif kind == "dwconv":
            mult = draw(st.integers(1, 2))
            lines.append(f"dwconv({draw(st.sampled_from([3, 5]))}, stride={draw(st.sampled_from([1, 2]))}, "
                         f"multiplier={mult})")
            c *= mult
        elif kind == "pwconv":
            c = draw(st.integers(1, 16))
            lines.append(f"pwconv({c})")
        elif kind == "bn":
            lines.append("bn")
        elif kind == "act":
            lines.append(draw(st.sampled_from(ACTS)))
        elif kind == "pool" and min(h, w) >= 2:
            lines.append(draw(st.sampled_from(["maxpool(2)", "avgpool(2)", "maxpool(3, stride=2, padding=1)"])))
        elif kind == "residual":
            s = draw(st.sampled_from([1, 2]))
            out = c = draw(st.integers(1, 8))
            lines.append(f"residual project {{ conv({out}, stride={s}, bias=false) bn relu conv({out}) bn }} relu")
        elif kind == "block":
            c = draw(st.integers(1, 8))
            lines.append(f"blk({c}, s={draw(st.sampled_from([1, 2]))})")
        elif kind == "repeat":
            lines.append(f"keep x {draw(st.integers(1, 3))}")
        elif kind == "group":
            lines.append(f"g{len(lines)}: {{ bn relu }}")  # labels are unique by position
        elif kind == "concat":
            a, b = draw(st.integers(1, 6)), draw(st.integers(1, 6))
            lines.append(f"concat {{ conv({a}, kernel=1) }} {{ conv({b}) relu }} {{ }}")
            c = c + a + b if not width_mult else c
        elif kind == "gate":
            lines.append("se")
        elif kind == "add":
            lines.append("mix")
        elif kind == "norm":
            lines.append(draw(st.sampled_from(["layernorm", "layerscale", "droppath(0.2)", "hardsigmoid",
                                               "adaptive_avgpool(2, 3) shuffle(1)"])))
        if lines and lines[-1].startswith("adaptive_avgpool"):
            h, w = 2, 3
        elif lines and lines[-1] in ("maxpool(2)", "avgpool(2)"):
            h, w = h // 2, w // 2
        elif lines and ("stride=2" in lines[-1] or "s=2" in lines[-1]):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        if draw(st.integers(0, 5)) == 0:
            lines.append(draw(st.sampled_from(["gap flatten", "flatten"])))
            flat = True
    if not flat:
        lines.append("gap flatten")
    lines.append("head: linear(classes, scale=false)")
    header = f"width_mult {width_mult} round_to {round_to}" if width_mult else ""
    body = "\n    ".join(lines)
    return f"""
block blk(out: int, s: int = 1) {{
    conv(out, stride=s) bn relu
}}
block keep() {{
    residual {{ dwconv(3) bn relu }}
}}
block se() {{
    gate {{ gap conv(max(1, in_channels // 2), kernel=1, scale=false) relu conv(in_channels, kernel=1, scale=false)
           sigmoid }}
}}
block mix() {{
    add {{ }} {{ pwconv(in_channels, scale=false) bn }} {{ dwconv(3) }}
}}
model random(classes: int = 5) {{
    input {shape}
    {header}
    {body}
}}
"""


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_random_spec_analysis_equals_module(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.spec"
        path.write_text(text)
        model = compiler.compile_spec(path)
    analysis = compiler.analyse(model)
    module = compiler.build_module(model)
    got = measure(module, model.input_shape)
    assert got["params"] == analysis.params, text
    assert got["macs"] == analysis.macs, text
    for row in analysis.rows:
        assert got["shapes"][row.path] == tuple(row.output), (row.path, text)
    assert got["output"] == (5,)
    state = [(k, tuple(v.shape)) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert state == weight_tensors(model)
    torch.set_grad_enabled(True)


FORMATS = ["fp32", "fp16", "int8", "int5-channel", "int4", "int3-channel", "int2"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), st.sampled_from(FORMATS), st.sampled_from(FORMATS))
def test_random_spec_with_a_precision_section_writes_the_predicted_file(text, default, head):
    from compiler.fileformat import SPEC
    from runtime.weights import ModelFile, save_model

    text = text.replace("    input ", f'    precision {default} {{ "head": {head} }}\n    input ', 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.spec"
        path.write_text(text)
        model = compiler.compile_spec(path)
        module = compiler.build_module(model)
        out = Path(tmp) / "m.safetensors"
        assert save_model(module, model, out, SPEC) == out.stat().st_size == compiler.predicted_bytes(model, SPEC)
        rebuilt = ModelFile(out).build()
        assert [k for k in rebuilt.state_dict()] == [k for k in module.state_dict()]
