"""Model card: parameters, MACs, depth and receptive field, computed from the layer graph.

Keras's summary gives parameters only. Here one walk over a functional model's
call graph (node by node, so shared layers count once per call, and into
nested models such as a keras.applications backbone) carries three things
along every tensor:

- depth: weight layers (Conv*, Dense, EinsumDense, MultiHeadAttention) on the
  longest path from the input to the output, so a projection shortcut, being on
  a shorter path, does not add to it: ResNet-18 has depth 18, VGG-16 16. A
  squeeze-excitation branch's two 1x1 convs do lie on the longest path.
- receptive field and jump (input pixels between neighbouring positions), per
  axis: a window of k taps, stride s, dilation d maps (rf, jump) to
  (rf + (d(k-1)+1 - 1) * jump, jump * s). Merges take the largest. The figures
  reported are those of the last spatial feature map, the one a global pooling,
  Flatten or reshape to tokens turns into a vector; once attention has mixed
  all tokens (ViT) the field is the whole image.
  A pooled vector broadcast back onto a map (squeeze-excitation) is global
  context and ignored; counting it would make every SE network's field the
  whole image and say nothing about its convolutions.
- multiply-accumulates per image of the conv, dense and attention layers only
  (not BN, activations, pooling or adds; biases not counted), the convention of
  the published figures (ResNet-50 4.1 GMACs).

Layers whose computation is hidden in a subclassed layer's `call` (not a
functional graph) count no MACs: only Keras's own layers are known.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction

import keras
from keras import layers

from pipeline.errors import ConfigError
from pipeline.models import architectures

CARD_KEYS = (
    "params",
    "trainable_params",
    "non_trainable_params",
    "macs",
    "depth",
    "receptive_field",
    "output_stride",
    "feature_map",
    "layers",
)

CONVS = (layers.Conv1D, layers.Conv2D, layers.Conv3D)
DEPTHWISE = (layers.DepthwiseConv1D, layers.DepthwiseConv2D)
SEPARABLE = (layers.SeparableConv1D, layers.SeparableConv2D)
TRANSPOSED = (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)
WEIGHT_LAYERS = (
    *CONVS,
    *DEPTHWISE,
    *SEPARABLE,
    *TRANSPOSED,
    layers.Dense,
    layers.EinsumDense,
    layers.MultiHeadAttention,
)


@dataclass(frozen=True)
class Flow:
    """What the walk knows about one tensor.

    `rf` and `jump` are (height, width) while the tensor is a spatial map and None
    after it was pooled or flattened; `last_map` then keeps (rf, jump, [H, W, C])
    of the map it came from.
    """

    depth: int
    rf: tuple[int, int] | None
    jump: tuple[Fraction, Fraction] | None
    last_map: tuple | None = None
    global_mix: bool = False


@dataclass
class Tally:
    """Totals over the whole walk."""

    side: int
    macs: int = 0
    layers: set = field(default_factory=set)  # ids of the distinct layers called


# ---------------------------------------------------------------- the walk


def model_card(model) -> dict:
    """Figures of a built functional (or Sequential) Keras model, for one image."""
    graph = _graph_of(model)
    if graph is None:
        raise ValueError(f"{model.name}: the model card needs a functional or Sequential model")
    image = graph.inputs[0]
    spatial = len(image.shape) == 4
    side = max(image.shape[1], image.shape[2]) if spatial else 0
    start = Flow(depth=0, rf=(1, 1), jump=(Fraction(1), Fraction(1))) if spatial else _vector(0)
    tally = Tally(side=side)
    outputs = _walk(graph, list(graph.inputs), [start] * len(graph.inputs), tally)
    tensor, flow = outputs[0]
    trainable = _count(model.trainable_weights)
    non_trainable = _count(model.non_trainable_weights)
    return {
        "params": trainable + non_trainable,
        "trainable_params": trainable,
        "non_trainable_params": non_trainable,
        "macs": tally.macs,
        "depth": max(f.depth for _, f in outputs),
        **_spatial_figures(tensor, flow, side),
        "layers": len(tally.layers),
    }


def _graph_of(op):
    """The Functional graph behind `op` (a Sequential wraps one), or None for other layers."""
    if isinstance(op, keras.Sequential):
        return op._functional
    return op if hasattr(op, "_nodes_by_depth") and hasattr(op, "outputs") else None


def _walk(graph, inputs: list, flows: list[Flow], tally: Tally) -> list[tuple]:
    """Run `graph` node by node from (tensor, Flow) inputs; return its (tensor, Flow) outputs.

    Keras has no public API for call events, so this reads `_nodes_by_depth`, the
    order Keras itself runs a Functional in.
    """
    tensors = {id(ref): value for ref, value in zip(graph.inputs, inputs, strict=True)}
    states = {id(ref): flow for ref, flow in zip(graph.inputs, flows, strict=True)}
    for level in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[level]:
            if node.is_input or node.operation is None:
                continue
            if any(id(x) not in tensors for x in node.input_tensors):
                continue  # not reachable from these inputs
            results = _call(node, tensors, states, tally)
            for ref, (value, flow) in zip(node.outputs, results, strict=True):
                tensors[id(ref)] = value
                states[id(ref)] = flow
    return [(tensors[id(ref)], states[id(ref)]) for ref in graph.outputs]


def _call(node, tensors: dict, states: dict, tally: Tally) -> list[tuple]:
    """One call event: recurse into a nested model, else count it and derive its output Flow."""
    op = node.operation
    ins = [tensors[id(x)] for x in node.input_tensors]
    flows = [states[id(x)] for x in node.input_tensors]
    inner = _graph_of(op)
    if inner is not None:
        return _walk(inner, ins, flows, tally)
    outs = _outputs(node, tensors, ins)
    if isinstance(op, layers.Layer):
        tally.layers.add(id(op))
    args, kwargs = node.arguments.fill_in(tensors)
    tally.macs += _macs(op, args, kwargs, ins, outs)
    flow = _next_flow(op, flows, ins, outs[0], tally.side)
    return [(out, flow) for out in outs]


def _outputs(node, tensors: dict, ins: list) -> list:
    """The node's recorded outputs, or recomputed ones where its inputs' shapes differ.

    They differ when a nested model was built for unknown sizes (None) and is
    called on concrete ones.
    """
    if all(tuple(a.shape) == tuple(r.shape) for a, r in zip(ins, node.input_tensors, strict=True)):
        return list(node.outputs)
    args, kwargs = node.arguments.fill_in(tensors)
    return keras.tree.flatten(node.operation.compute_output_spec(*args, **kwargs))


def _count(weights) -> int:
    return sum(math.prod(w.shape) for w in weights)


# ---------------------------------------------------------------- receptive field and depth


def _vector(depth: int, last_map=None, global_mix: bool = False) -> Flow:
    """Flow of a tensor that is no longer a spatial map."""
    return Flow(depth=depth, rf=None, jump=None, last_map=last_map, global_mix=global_mix)


def _next_flow(op, flows: list[Flow], ins: list, out, side: int) -> Flow:
    """The output's Flow: depth + 1 for a weight layer, the receptive field rules of the module."""
    depth = max((f.depth for f in flows), default=0) + isinstance(op, WEIGHT_LAYERS)
    global_mix = any(f.global_mix for f in flows) or "Attention" in type(op).__name__
    maps = [(f, x) for f, x in zip(flows, ins, strict=True) if f.rf is not None]
    if not maps:
        last = max((f.last_map for f in flows if f.last_map), key=lambda m: m[0], default=None)
        return _vector(depth, last, global_mix)
    rf = tuple(max(f.rf[axis] for f, _ in maps) for axis in (0, 1))
    jump = tuple(max(f.jump[axis] for f, _ in maps) for axis in (0, 1))
    before = maps[0][1].shape[1:3]
    if type(op).__name__.startswith("Global") or len(out.shape) < 4:
        return _vector(depth, (rf, jump, list(maps[0][1].shape[1:])), global_mix)
    if global_mix:
        rf = tuple(max(r, side) for r in rf)
    rf, jump = _spatial_step(op, rf, jump, before, out.shape[1:3])
    return Flow(depth, rf, jump, global_mix=global_mix)


def _spatial_step(op, rf: tuple, jump: tuple, before, after) -> tuple[tuple, tuple]:
    """(rf, jump) after a layer that maps a spatial map to a spatial map."""
    window = getattr(op, "kernel_size", None) or getattr(op, "pool_size", None)
    if window is not None and hasattr(op, "strides"):
        dilation = getattr(op, "dilation_rate", 1)
        transposed = isinstance(op, TRANSPOSED)
        return _window(rf, jump, window, op.strides, dilation, transposed=transposed)
    if isinstance(op, layers.UpSampling2D):
        return rf, tuple(j / s for j, s in zip(jump, op.size, strict=True))
    if tuple(before) == tuple(after) or None in (*before, *after):
        return rf, jump  # pointwise: normalization, activation, add, concatenate, 1x1 reshape
    factors = [b // a if a and b % a == 0 else 1 for b, a in zip(before, after, strict=True)]
    if all(f > 1 for f in factors):
        # an unknown layer shrinking the map by whole factors (space-to-depth, patches)
        return _window(rf, jump, factors, factors, 1)
    return rf, jump  # padding (ZeroPadding2D, Pad2D) and cropping


def _window(rf, jump, kernel, strides, dilation, *, transposed: bool = False):
    """(rf, jump) after a sliding window of `kernel` taps per axis."""
    kernel, strides, dilation = (_pair(v) for v in (kernel, strides, dilation))
    new_rf, new_jump = [], []
    for axis in (0, 1):
        span = dilation[axis] * (kernel[axis] - 1) + 1
        if transposed:
            # each output reads ceil(span / stride) input positions, `stride` times denser
            span = -(-span // strides[axis])
            new_jump.append(jump[axis] / strides[axis])
        else:
            new_jump.append(jump[axis] * strides[axis])
        new_rf.append(rf[axis] + (span - 1) * jump[axis])
    return tuple(new_rf), tuple(new_jump)


def _pair(value) -> tuple[int, int]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return (values[0], values[-1]) if len(values) < 3 else values[:2]


def _spatial_figures(tensor, flow: Flow, side: int) -> dict:
    """receptive_field, output_stride and feature_map of the last spatial map."""
    if flow.rf is not None:
        rf, jump, shape = flow.rf, flow.jump, list(tensor.shape[1:])
    elif flow.last_map is not None:
        rf, jump, shape = flow.last_map
    else:
        return {"receptive_field": None, "output_stride": None, "feature_map": None}
    field = side if flow.global_mix else max(rf)
    stride = max(jump)
    return {
        "receptive_field": int(field),
        "output_stride": int(stride) if stride.denominator == 1 else float(stride),
        "feature_map": [None if d is None else int(d) for d in shape],
    }


# ---------------------------------------------------------------- multiply-accumulates


def _macs(op, args, kwargs, ins: list, outs: list) -> int:
    """Multiply-accumulates of one call, for one image (batch size 1)."""
    if not ins:
        return 0
    x, y = ins[0].shape, outs[0].shape
    if isinstance(op, layers.MultiHeadAttention):
        return _attention_macs(op, args, kwargs, y)
    if isinstance(op, layers.EinsumDense):
        return _einsum_macs(op.equation, [x, op.kernel.shape])
    if isinstance(op, layers.Dense):
        return _positions(x[:-1]) * x[-1] * op.units
    if type(op).__name__ == "Einsum":
        return _einsum_macs(op.subscripts, [t.shape for t in ins])
    if type(op).__name__ == "Matmul":
        return _positions(y) * ins[0].shape[-1]
    if not isinstance(op, (*CONVS, *DEPTHWISE, *SEPARABLE, *TRANSPOSED)):
        return 0
    return _conv_macs(op, x, y)


def _conv_macs(op, x, y) -> int:
    """Convolutions: output positions x taps x input channels per group x output channels."""
    first = op.data_format == "channels_first"
    cin = x[1] if first else x[-1]
    positions = _positions(y[2:] if first else y[1:-1])
    taps = math.prod(op.kernel_size)
    if isinstance(op, DEPTHWISE):
        return positions * taps * cin * op.depth_multiplier
    if isinstance(op, SEPARABLE):
        mid = cin * op.depth_multiplier
        return positions * taps * mid + positions * mid * op.filters
    if isinstance(op, TRANSPOSED):
        # every input position scatters its kernel
        return _positions(x[2:] if first else x[1:-1]) * taps * cin * op.filters
    return positions * taps * (cin // op.groups) * op.filters


def _attention_macs(op, args, kwargs, out_shape) -> int:
    """Q, K, V and output projections plus the two attention matmuls (QK^T and AV)."""
    query = kwargs.get("query", args[0] if args else None)
    value = kwargs.get("value", args[1] if len(args) > 1 else query)
    key = kwargs.get("key", args[2] if len(args) > 2 else None)
    key = value if key is None else key
    heads, dk, dv = op.num_heads, op.key_dim, op.value_dim or op.key_dim
    nq, nk = _positions(query.shape[1:-1]), _positions(key.shape[1:-1])
    projections = (
        nq * query.shape[-1] * heads * dk
        + nk * key.shape[-1] * heads * dk
        + nk * value.shape[-1] * heads * dv
        + nq * heads * dv * _positions(out_shape[-1:])
    )
    return projections + nq * nk * heads * (dk + dv)


def _einsum_macs(equation: str, shapes: list) -> int:
    """Product of the sizes of every index of an einsum (unknown sizes, the batch, count 1)."""
    terms = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=False):
        if "..." in term:
            extra = len(shape) - (len(term) - 3)
            term = term.replace("...", "".join(f"<{i}>" for i in range(extra)))
        for index, size in zip(re.findall(r"<\d+>|\w", term), shape, strict=False):
            sizes[index] = max(sizes.get(index, 1), size or 1)
    return math.prod(sizes.values())


def _positions(dims) -> int:
    """How many positions a layer is applied at (unknown sizes count 1)."""
    return math.prod(d or 1 for d in dims)


# ---------------------------------------------------------------- the registry


def registry_cards(
    image_size: int | None,
    num_classes: int,
    channels: int = 3,
    names: list[str] | None = None,
    small_input: bool = False,
) -> list[dict]:
    """A card for each registered architecture (or `names`), as published by default.

    `small_input=True` describes the CIFAR-style stems (no early downsampling).

    `image_size=None` builds each at its ImageNet size. An architecture that
    needs larger images gets an "error" entry with null figures instead.
    """
    known = architectures.list_models()
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise ConfigError(f"unknown architecture {unknown[0]!r}; known: {', '.join(known)}")
    return [
        _registry_card(name, image_size, num_classes, channels, small_input)
        for name in names or known
    ]


def _registry_card(
    name: str, image_size: int | None, num_classes: int, channels: int, small_input: bool
) -> dict:
    spec = architectures.get_spec(name)
    side = image_size or spec.imagenet_size
    shape = (side, side, channels)
    if side < spec.min_size:
        reason = f"needs images of at least {spec.min_size}x{spec.min_size}, got {side}x{side}"
        return {"name": name, **dict.fromkeys(CARD_KEYS), "input": list(shape), "error": reason}
    model = architectures.build_model(name, shape, num_classes, small_input=small_input)
    try:
        return {"name": name, **model_card(model), "input": list(shape)}
    finally:
        del model
        keras.backend.clear_session()


def format_table(cards: list[dict]) -> str:
    """Aligned text table, one row per card; an error replaces a row's figures."""
    header = ["name", "input", "params (M)", "trainable (M)", "MACs (G)", "depth", "RF", "stride"]
    rows = [_table_row(card) for card in cards]
    full = [header, *(r for r in rows if len(r) == len(header))]  # an error row spans figures
    widths = [max(len(r[i]) for r in (full if i > 1 else [header, *rows])) for i in range(8)]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        if len(row) == 3:  # an error spans the figures
            cells.append(row[2])
        else:
            cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _table_row(card: dict) -> list[str]:
    size = "x".join(str(d) for d in card.get("input") or [])
    if card.get("error"):
        return [card["name"], size, f"error: {card['error']}"]
    return [
        card["name"],
        size,
        f"{card['params'] / 1e6:.2f}",
        f"{card['trainable_params'] / 1e6:.2f}",
        f"{card['macs'] / 1e9:.3f}",
        str(card["depth"]),
        str(card["receptive_field"]),
        str(card["output_stride"]),
    ]
