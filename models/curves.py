"""Curves in weight space between trained networks (Garipov et al., NeurIPS 2018).

A curve with `num_bends` bends theta_0 .. theta_{n-1} (theta_0 and theta_{n-1} are the endpoint
networks) is theta(t) = sum_k c_k(t) theta_k for t in [0, 1], with the coefficients c_k(t) of a
Bezier curve or of a polygonal chain. `CurveNet` holds the bends of every parameter of any
`nn.Module` and runs that module with theta(t) through `torch.func.functional_call`, so no layer
is ever written twice. A 2-bend chain is the straight segment between the endpoints.

Example::
    >>> net = connect(start, end, Bezier, num_bends=3)   # interior bend on the segment
    >>> out = net(x)                 # one t ~ U(0, 1) for the batch; net.sq_norm = ||theta(t)||^2
    >>> mid = net.point_at(0.5)      # an ordinary Autoencoder holding theta(0.5)
"""
import argparse
import copy
from math import comb

import torch
from torch import nn
from torch.func import functional_call


def _check_bends(num_bends):
    if int(num_bends) != num_bends or num_bends < 2:
        raise ValueError(f"a curve needs num_bends >= 2 (its two ends), got {num_bends}")


class Bezier(nn.Module):
    """Bernstein coefficients c_k(t) = C(n-1, k) t^k (1-t)^(n-1-k), k = 0..n-1."""

    def __init__(self, num_bends):
        super().__init__()
        _check_bends(num_bends)
        n = num_bends
        self.register_buffer("binom", torch.tensor([float(comb(n - 1, k)) for k in range(n)]), persistent=False)
        self.register_buffer("powers", torch.arange(n, dtype=torch.float32), persistent=False)

    def forward(self, t):
        t = torch.as_tensor(t, dtype=self.binom.dtype, device=self.binom.device)
        return self.binom * t ** self.powers * (1 - t) ** self.powers.flip(0)


class PolyChain(nn.Module):
    """Hat functions c_k(t) = max(0, 1 - |t (n-1) - k|): bends evenly spaced in t."""

    def __init__(self, num_bends):
        super().__init__()
        _check_bends(num_bends)
        self.register_buffer("knots", torch.arange(num_bends, dtype=torch.float32), persistent=False)

    def forward(self, t):
        t = torch.as_tensor(t, dtype=self.knots.dtype, device=self.knots.device)
        return torch.clamp(1 - torch.abs(t * (len(self.knots) - 1) - self.knots), min=0)


CURVES = {"bezier": Bezier, "polychain": PolyChain}


def curve_class(name):
    """'Bezier' / 'bezier' / 'PolyChain' ... -> the class; anything else is a ValueError."""
    try:
        return CURVES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown curve {name!r}; choose Bezier or PolyChain") from None


def curve_name(text):
    """argparse type: a curve name in any case -> its canonical spelling ('Bezier', 'PolyChain')."""
    try:
        return curve_class(text).__name__
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _split(name):
    """'decoder.4.weight' -> ('decoder.4', 'weight')."""
    module, _, attr = name.rpartition(".")
    return module, attr


class CurveNet(nn.Module):
    """`num_bends` copies of every parameter of `base`, and `base` run at theta(t).

    self.bends[k] is a copy of `base` that holds only the parameters of bend k (no buffers);
    self.base is a copy of `base` that holds only its buffers (the one set of BatchNorm running
    statistics, re-estimated at each t before evaluation; see paths.update_bn). The first and last
    bends are frozen when `fix_start` / `fix_end`.
    """

    def __init__(self, base, curve, num_bends, fix_start=True, fix_end=True):
        super().__init__()
        if isinstance(curve, str):
            curve = curve_class(curve)
        self.curve = curve.__name__
        self.num_bends = num_bends
        self.fix_start, self.fix_end = fix_start, fix_end
        self.coeff_layer = curve(num_bends)
        self.names = [name for name, _ in base.named_parameters()]
        self.bends = nn.ModuleList()
        for _ in range(num_bends):
            bend = copy.deepcopy(base)
            for m in bend.modules():
                m._buffers.clear()
            self.bends.append(bend)
        self.base = copy.deepcopy(base)
        for m in self.base.modules():  # functional_call supplies the parameters
            for key in [k for k, v in m._parameters.items() if v is not None]:
                del m._parameters[key]
        self.bends[0].requires_grad_(not fix_start)
        self.bends[-1].requires_grad_(not fix_end)
        self.sq_norm = None
        self.t_sampler = None  # how forward draws t when none is given (None: U(0, 1), global RNG)

    def bend_parameters(self, name):
        return [bend.get_parameter(name) for bend in self.bends]

    @torch.no_grad()
    def import_base(self, model, index):
        """Copy `model`'s parameters into bend `index`, matched by name."""
        mine = {n: tuple(self.bends[index].get_parameter(n).shape) for n in self.names}
        theirs = {n: tuple(p.shape) for n, p in model.named_parameters()}
        problems = [f"missing {n}" for n in mine if n not in theirs]
        problems += [f"unexpected {n}" for n in theirs if n not in mine]
        problems += [f"{n}: shape {theirs[n]} vs {mine[n]}" for n in mine
                     if n in theirs and theirs[n] != mine[n]]
        if problems:
            raise ValueError(f"cannot import {type(model).__name__} into bend {index}: "
                             + "; ".join(problems))
        params = dict(model.named_parameters())
        for n in self.names:
            self.bends[index].get_parameter(n).copy_(params[n])

    @torch.no_grad()
    def init_linear(self):
        """Place the interior bends evenly on the segment between the two ends (Garipov)."""
        last = self.num_bends - 1
        for n in self.names:
            ps = self.bend_parameters(n)
            for k in range(1, last):
                ps[k].copy_(ps[0] * (1 - k / last) + ps[last] * (k / last))

    def weights(self, t):
        """theta(t): {parameter name: sum_k c_k(t) theta_k} (one fused multiply-add per bend: the
        combination is most of what a curve step costs beyond an endpoint step on a small model)."""
        coeffs = self.coeff_layer(t)
        theta = {}
        for n in self.names:
            ps = self.bend_parameters(n)
            value = ps[0] * coeffs[0]
            for c, p in zip(coeffs[1:], ps[1:]):
                value = torch.addcmul(value, p, c)
            theta[n] = value
        return theta

    def forward(self, x, t=None):
        """Run the base module at theta(t); t ~ U(0, 1), one for the whole batch, when None.

        Also sets self.sq_norm = ||theta(t)||^2 (all parameters), for the weight-decay term
        0.5 * wd * ||theta(t)||^2 of the sampled point (Garipov's CurveNet.l2).
        """
        if t is None:
            t = torch.rand((), device=x.device) if self.t_sampler is None else self.t_sampler(x.device)
        theta = self.weights(t)
        self.sq_norm = sum(p.pow(2).sum() for p in theta.values())
        return functional_call(self.base, theta, (x,))

    @torch.no_grad()
    def point_at(self, t):
        """An ordinary copy of the base module holding theta(t) and a copy of the base's buffers.
        (To evaluate many points, paths.PointEvaluator loads each theta into one module instead.)"""
        theta = self.weights(t)
        model = copy.deepcopy(self.base)
        for n, value in theta.items():
            module, attr = _split(n)
            model.get_submodule(module).register_parameter(attr, nn.Parameter(value.detach().clone()))
        return model


T_SAMPLING = ("shared", "per_rank", "stratified")


class TSampler:
    """How the processes of a torchrun run draw t for a training step (Garipov's loss is the
    expectation over t ~ U(0, 1)): "shared", one t for the whole batch as a single process draws;
    "per_rank", an independent t per process; "stratified", process r of R draws t in
    [r / R, (r + 1) / R), so every step averages the gradient over the whole curve. A generator of
    its own, on the device, seeded from the run's seed (and the rank, unless shared)."""

    def __init__(self, mode, seed, rank, world, device):
        if mode not in T_SAMPLING:
            raise ValueError(f"t sampling must be one of {T_SAMPLING}, got {mode!r}")
        self.mode, self.rank, self.world = mode, rank, world
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed if mode == "shared" else seed * 1_000_003 + rank)

    def __call__(self, device):
        u = torch.rand((), generator=self.generator, device=device)
        return (self.rank + u) / self.world if self.mode == "stratified" else u

    def get_state(self):
        return self.generator.get_state()

    def set_state(self, state):
        self.generator.set_state(state)


def connect(start, end, curve=PolyChain, num_bends=2, fix_start=True, fix_end=True, init_linear=True,
            template=None):
    """The curve from `start` (t = 0) to `end` (t = 1), both modules of one architecture; with the
    defaults, the straight segment between them (a 2-bend PolyChain). Either end may be None: that
    end then keeps `template`'s parameters. With `init_linear` the interior bends start evenly on
    the segment (Garipov). The base module (and its buffers) is a copy of `template`, else `start`."""
    template = template if template is not None else start if start is not None else end
    net = CurveNet(template, curve, num_bends, fix_start, fix_end)
    if start is not None:
        net.import_base(start, 0)
    if end is not None:
        net.import_base(end, num_bends - 1)
    if init_linear:
        net.init_linear()
    return net
