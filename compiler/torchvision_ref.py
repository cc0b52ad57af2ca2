"""`torchvision NAME(...)` references: counted by building the model on the meta device.

The meta device allocates no weights, so even ResNet50 is analysed in well under a
second; shapes come from forward hooks and MACs from torch's own flop counter.
This module imports torch, so only specs that reference torchvision pay for it.
"""
from __future__ import annotations

from .errors import Span
from .ops import LayerError, Tensor


def build_torchvision(name: str, kwargs: dict, device=None):
    import torchvision

    # Classification models only: one image batch in, one logits tensor out (detection and
    # segmentation models take other inputs and return tuples or dicts).
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        from .errors import did_you_mean

        raise LayerError(f"torchvision has no classification model `{name}`", hint=did_you_mean(name, known))
    if "weights" in kwargs or "weights_backbone" in kwargs:
        raise LayerError("a spec never names pretrained weights (building never downloads); "
                         "give torchvision_weights in the recipe's models section instead")
    if isinstance(kwargs.get("num_classes"), int) and kwargs["num_classes"] < 1:
        raise LayerError(f"num_classes must be at least 1, got {kwargs['num_classes']}")
    import warnings

    import torch

    try:
        # FutureWarnings about torchvision's own future defaults (googlenet, inception_v3) are not the user's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                with torch.device(device or "cpu"):
                    return torchvision.models.get_model(name, weights=None, **kwargs)
            except NotImplementedError:  # a builder that computes its widths with tensors (regnet): not on meta
                return torchvision.models.get_model(name, weights=None, **kwargs).to(device or "cpu")
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise LayerError(f"torchvision `{name}` rejects its arguments: {err}") from None


def resolve_torchvision(name: str, kwargs: dict, shape: tuple, node_name: str, path: str, span: Span | None):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .tree import Node

    model = build_torchvision(name, kwargs, device="meta").eval()
    children = dict(model.named_children())
    shapes: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: shapes.__setitem__(n, tuple(out.shape[1:])))
             for n, m in children.items()]
    counter = FlopCounterMode(display=False)
    # a model's own checks of its input fail in many ways (vit: AssertionError on the image size)
    failures = (RuntimeError, AssertionError, ValueError, TypeError, IndexError, AttributeError)
    try:
        with torch.no_grad(), counter:
            out = model(torch.empty((1, *shape), device="meta"))
        with torch.no_grad():  # training forward (batch 2: BatchNorm needs two values per channel)
            training_out = model.train()(torch.empty((2, *shape), device="meta"))
        model.eval()
    except failures as err:
        raise LayerError(f"torchvision `{name}` cannot take a {'x'.join(map(str, shape))} input: "
                         f"{type(err).__name__}: {err}") from None
    finally:
        for h in hooks:
            h.remove()
    if not isinstance(out, torch.Tensor) or not isinstance(training_out, torch.Tensor) or out.dim() != 2:
        what = type(training_out if isinstance(out, torch.Tensor) else out).__name__
        raise LayerError(f"torchvision `{name}` returns {what} (in training), not one logits tensor",
                         hint="turn its auxiliary outputs off, e.g. aux_logits=false")
    flops = counter.get_flop_counts()
    root_name = type(model).__name__
    own: dict[str, list[Tensor]] = {n: [] for n in children}
    root_tensors = []
    params = {n for n, _ in model.named_parameters()}
    for full, t in model.state_dict(keep_vars=True).items():
        if full.endswith("num_batches_tracked"):
            continue
        tensor = Tensor(full, tuple(t.shape), is_param=full in params)
        head, _, rest = full.partition(".")
        if head in own and rest:
            own[head].append(Tensor(rest, tensor.shape, is_param=tensor.is_param))
        else:
            root_tensors.append(tensor)
    nodes = []
    prev = shape
    for n, mod in children.items():
        child_path = f"{path}.{n}" if path else n
        child_flops = sum(flops.get(f"{root_name}.{n}", {}).values())
        out_shape = shapes.get(n, prev)
        nodes.append(Node(n, child_path, type(mod).__name__, "tv-part", prev, out_shape,
                          tensors=own[n], macs=child_flops // 2, span=span))
        prev = out_shape
    return Node(node_name, path, f"torchvision:{name}", "torchvision", shape, tuple(out.shape[1:]),
                attrs={"name": name, "kwargs": kwargs}, children=nodes, span=span, tensors=root_tensors)
