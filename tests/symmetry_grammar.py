"""A grammar of the small autoencoders users write, for the symmetry fuzzer (tests/test_symmetry_fuzz.py).

A recipe is plain data (so that hypothesis can shrink it and a counterexample can be pasted into a
regression test): (in_channels, size, seed, ops). Each op transforms the current activation, a
conv stream (C, H, W) or a flat one (F,):

  ("conv", out, kernel, stride, padding, groups, transposed, output_padding)
  ("norm", kind, groups)      kind: batch, group, layer_chw, layer_w, layer_hw (conv), layer (flat)
  ("act", name)               relu, silu, tanh, sigmoid, leaky
  ("res", [ops])              h + f(h), f keeping the shape
  ("cat", [ops])              torch.cat([h, f(h)], 1)
  ("param", how)              h * p, h / (|p| + 0.5) or h + p, p one value per channel
  ("pool", kind)              max, avg (2x2) or adaptive (to 1x1)
  ("up", mode)                nearest, bilinear (x2) or ("resize", size)
  ("flatten",), ("linear", out), ("linear_to", C, H, W) (a Linear and an Unflatten)

The model ends with an op producing (in_channels, size, size): its producer is `model.output_layer`.
"""
import torch
from hypothesis import strategies as st
from torch import nn

ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "leaky": lambda: nn.LeakyReLU(0.1)}


def conv_shape(op, shape):
    _, out, k, s, p, _, transposed, op_pad = op
    _, h, w = shape
    if transposed:
        return (out, (h - 1) * s - 2 * p + k + op_pad, (w - 1) * s - 2 * p + k + op_pad)
    return (out, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)


def next_shape(op, shape):
    kind = op[0]
    if kind == "conv":
        return conv_shape(op, shape)
    if kind == "cat":
        inner = shape
        for sub in op[1]:
            inner = next_shape(sub, inner)
        return (shape[0] + inner[0],) + tuple(shape[1:])
    if kind == "pool":
        return (shape[0], 1, 1) if op[1] == "adaptive" else (shape[0], shape[1] // 2, shape[2] // 2)
    if kind == "up":
        return (shape[0], shape[1] * 2, shape[2] * 2)
    if kind == "resize":
        return (shape[0], op[1], op[1])
    if kind == "flatten":
        return (shape[0] * shape[1] * shape[2],)
    if kind == "linear":
        return (op[1],)
    if kind == "linear_to":
        return tuple(op[1:])
    return shape  # norm, act, res, param


class Drawn(nn.Module):
    """The model of a recipe: `program` (plain tuples) run over `layers` and the parameters p0, p1, ..."""

    def __init__(self, in_channels, size, ops):
        super().__init__()
        self.config = dict(in_channels=in_channels, image_size=size)
        self.layers = nn.ModuleList()
        self.program = []
        self.output_layer = None
        self.params = 0
        out = self._ops(ops, 0, (in_channels, size, size))
        assert out[1] == (in_channels, size, size), out

    def _add(self, module, src):
        self.layers.append(module)
        self.program.append(("m", len(self.layers) - 1, src))
        return len(self.program)  # register of the result (register 0: the input)

    def _ops(self, ops, reg, shape):
        for op in ops:
            reg, shape = self._op(op, reg, shape)
        return reg, shape

    def _op(self, op, reg, shape):
        kind = op[0]
        if kind == "conv":
            _, out, k, s, p, g, transposed, op_pad = op
            if transposed:
                module = nn.ConvTranspose2d(shape[0], out, k, stride=s, padding=p, output_padding=op_pad, groups=g)
            else:
                module = nn.Conv2d(shape[0], out, k, stride=s, padding=p, groups=g)
            reg = self._add(module, reg)
            self.output_layer = f"layers.{len(self.layers) - 1}"
        elif kind == "norm":
            _, norm, g = op
            c = shape[0]
            module = {"batch": lambda: nn.BatchNorm2d(c) if len(shape) == 3 else nn.BatchNorm1d(c),
                      "group": lambda: nn.GroupNorm(g, c),
                      "layer_chw": lambda: nn.LayerNorm(tuple(shape)),
                      "layer_w": lambda: nn.LayerNorm((shape[-1],)),
                      "layer_hw": lambda: nn.LayerNorm(tuple(shape[1:])),
                      "layer": lambda: nn.LayerNorm((c,))}[norm]()
            reg = self._add(module, reg)
        elif kind == "act":
            reg = self._add(ACTS[op[1]](), reg)
        elif kind in ("res", "cat"):
            inner, inner_shape = self._ops(op[1], reg, shape)
            self.program.append(("add" if kind == "res" else "cat", reg, inner))
            reg = len(self.program)
        elif kind == "param":
            name = f"p{self.params}"
            self.params += 1
            value_shape = (1, shape[0], 1, 1) if len(shape) == 3 else (shape[0],)
            self.register_parameter(name, nn.Parameter(torch.rand(value_shape) + 0.5))
            self.program.append((op[1], reg, name))
            reg = len(self.program)
        elif kind == "pool":
            module = {"max": lambda: nn.MaxPool2d(2), "avg": lambda: nn.AvgPool2d(2),
                      "adaptive": lambda: nn.AdaptiveAvgPool2d(1)}[op[1]]()
            reg = self._add(module, reg)
        elif kind == "up":
            reg = self._add(nn.Upsample(scale_factor=2, mode=op[1]), reg)
        elif kind == "resize":
            reg = self._add(nn.Upsample(size=(op[1], op[1])), reg)
        elif kind == "flatten":
            reg = self._add(nn.Flatten(), reg)
        elif kind == "linear":
            reg = self._add(nn.Linear(shape[0], op[1]), reg)
            self.output_layer = f"layers.{len(self.layers) - 1}"
        elif kind == "linear_to":
            reg = self._add(nn.Linear(shape[0], op[1] * op[2] * op[3]), reg)
            self.output_layer = f"layers.{len(self.layers) - 1}"
            reg = self._add(nn.Unflatten(1, tuple(op[1:])), reg)
        else:
            raise ValueError(op)
        return reg, next_shape(op, shape)

    def forward(self, x):
        regs = [x]
        for step in self.program:
            if step[0] == "m":
                regs.append(self.layers[step[1]](regs[step[2]]))
            elif step[0] == "add":
                regs.append(regs[step[1]] + regs[step[2]])
            elif step[0] == "cat":
                regs.append(torch.cat([regs[step[1]], regs[step[2]]], 1))
            elif step[0] == "mul":
                regs.append(regs[step[1]] * getattr(self, step[2]))
            elif step[0] == "div":
                regs.append(regs[step[1]] / (getattr(self, step[2]).abs() + 0.5))
            else:  # "plus"
                regs.append(regs[step[1]] + getattr(self, step[2]))
        return regs[-1]


def build(recipe):
    """The recipe's model in float64 and eval mode, every parameter and BatchNorm statistic distinct."""
    in_channels, size, seed, ops = recipe
    torch.manual_seed(seed)
    model = Drawn(in_channels, size, ops)
    return randomised(model, seed)


def randomised(model, seed):
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def norms(draw, shape):
    if len(shape) == 3:
        kind = draw(st.sampled_from(["none", "batch", "group", "layer_chw", "layer_w", "layer_hw"]))
    else:
        kind = draw(st.sampled_from(["none", "batch", "group", "layer"]))
    if kind == "none":
        return []
    groups = draw(st.sampled_from(_divisors(shape[0]))) if kind == "group" else 1
    return [("norm", kind, groups)]


@st.composite
def acts(draw):
    name = draw(st.sampled_from(["none", *ACTS]))
    return [] if name == "none" else [("act", name)]


@st.composite
def convs(draw, shape, out=None, keep_size=False):
    c, h, _ = shape
    out = out or draw(st.sampled_from([2, 4, 6, 8]))
    transposed = draw(st.booleans())
    if keep_size:
        geometry = [(3, 1, 1, 0), (1, 1, 0, 0)]
    elif transposed:
        geometry = [(3, 1, 1, 0)] + ([(2, 2, 0, 0), (3, 2, 1, 1), (4, 2, 1, 0), (3, 2, 1, 0)] if h <= 8 else [])
    else:
        geometry = [(3, 1, 1, 0), (1, 1, 0, 0)] + ([(3, 2, 1, 0)] if h >= 3 else []) + \
            ([(2, 2, 0, 0)] if h % 2 == 0 else [])
    k, s, p, op_pad = draw(st.sampled_from(geometry))
    groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if c % g == 0 and out % g == 0]))
    return ("conv", out, k, s, p, groups, transposed, op_pad)


@st.composite
def blocks(draw, shape):
    """One block of ops from `shape`: a list of ops."""
    if len(shape) == 3:
        c, h, _ = shape
        kinds = ["conv", "res", "cat", "param", "flatten"] + (["pool"] if h >= 2 and h % 2 == 0 else []) + \
            (["up"] if h <= 8 else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            conv = draw(convs(shape))
            return [conv, *draw(norms(next_shape(conv, shape))), *draw(acts())]
        if kind == "res":
            inner = [draw(convs(shape, out=c, keep_size=True)), *draw(norms(shape))]
            if draw(st.booleans()):
                inner += [*draw(acts()), draw(convs(shape, out=c, keep_size=True)), *draw(norms(shape))]
            return [("res", inner), *draw(acts())]
        if kind == "cat":
            conv = draw(convs(shape, keep_size=True))
            return [("cat", [conv, *draw(norms(next_shape(conv, shape))), *draw(acts())])]
        if kind == "param":
            return [("param", draw(st.sampled_from(["mul", "div", "plus"])))]
        if kind == "pool":
            return [("pool", draw(st.sampled_from(["max", "avg", "adaptive"])))]
        if kind == "up":
            return [("up", draw(st.sampled_from(["nearest", "bilinear"])))]
        return [("flatten",)]
    (f,) = shape
    kind = draw(st.sampled_from(["linear", "res", "param", "linear_to"]))
    if kind == "linear":
        out = draw(st.sampled_from([4, 6, 8, 12]))
        return [("linear", out), *draw(norms((out,))), *draw(acts())]
    if kind == "res":
        return [("res", [("linear", f), *draw(norms(shape))]), *draw(acts())]
    if kind == "param":
        return [("param", draw(st.sampled_from(["mul", "div", "plus"])))]
    c, side = draw(st.sampled_from([2, 4, 8])), draw(st.sampled_from([2, 4]))
    return [("linear_to", c, side, side), *draw(norms((c, side, side))), *draw(acts())]


@st.composite
def recipes(draw, max_blocks=5):
    in_channels = draw(st.sampled_from([1, 2, 3]))
    size = draw(st.sampled_from([4, 6, 8]))
    seed = draw(st.integers(0, 2 ** 16))
    shape, ops = (in_channels, size, size), []
    for _ in range(draw(st.integers(1, max_blocks))):
        for op in draw(blocks(shape)):
            ops.append(op)
            shape = next_shape(op, shape)
    if len(shape) == 1:
        ops.append(("linear_to", in_channels, size, size))
    else:
        if shape[1:] != (size, size):
            ops.append(("resize", size))
        ops.append(("conv", in_channels, 3, 1, 1, 1, draw(st.booleans()), 0))
    if draw(st.booleans()):
        ops.append(("act", "tanh"))
    return in_channels, size, seed, ops
