import numpy as np
import pytest
import torch
from torch import nn

from aemc.evaluation import update_bn
from models.autoencoder import Autoencoder
from models.curves import Bezier, CurveNet, PolyChain, connect, curve_class


def tiny(seed, init="normal", f=4):
    torch.manual_seed(seed)
    return Autoencoder(in_filters=f, latent_dim=8, conv_init=init)


def make_curve(curve=Bezier, n=3, **kw):
    a, b = tiny(0), tiny(1, "kaiming_normal")
    return connect(a, b, curve, n, template=tiny(2), **kw), a, b


def params(model):
    return dict(model.named_parameters())


# ----------------------------------------------------------------------------- coefficients

def de_casteljau(points, t):
    """A point of the Bezier curve with control points `points` by de Casteljau's recursion:
    repeated linear interpolation of neighbours, independent of the Bernstein closed form."""
    while len(points) > 1:
        points = [(1 - t) * a + t * b for a, b in zip(points[:-1], points[1:])]
    return points[0]


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_bezier_coefficients_agree_with_de_casteljau(n):
    # with unit vectors e_k as control points, de Casteljau's point is the coefficient vector
    basis = list(np.eye(n))
    for t in np.random.default_rng(n).uniform(size=20).tolist() + [0.0, 1.0]:
        got = Bezier(n)(t).double().numpy()
        assert np.allclose(got, de_casteljau(basis, t), atol=1e-6)
    assert Bezier(n)(0.0).tolist() == [1.0] + [0.0] * (n - 1)
    assert Bezier(n)(1.0).tolist() == [0.0] * (n - 1) + [1.0]


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_polychain_is_linear_interpolation_of_the_knots(n):
    # the chain through bends theta_k at t = k / (n - 1): np.interp of random knot values
    knots = np.linspace(0, 1, n)
    values = np.random.default_rng(n).normal(size=(3, n))
    for t in np.random.default_rng(10 + n).uniform(size=20).tolist() + knots.tolist():
        coeffs = PolyChain(n)(t).double().numpy()
        for v in values:
            assert coeffs @ v == pytest.approx(np.interp(t, knots, v), abs=1e-6)
        assert (coeffs > 0).sum() <= 2  # at most two neighbouring bends are active


def test_fewer_than_two_bends_and_unknown_names_are_errors():
    for cls in (Bezier, PolyChain):
        with pytest.raises(ValueError, match="num_bends >= 2"):
            cls(1)
    assert curve_class("bezier") is Bezier and curve_class("POLYCHAIN") is PolyChain
    with pytest.raises(ValueError, match="unknown curve"):
        curve_class("spline")


# ----------------------------------------------------------------------------- CurveNet

@pytest.mark.parametrize("curve", [Bezier, PolyChain])
def test_two_bend_curve_is_linear_interpolation_of_parameters(curve):
    net, a, b = make_curve(curve, n=2)
    pa, pb = params(a), params(b)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    for t in (0.0, 0.25, 0.7, 1.0):
        point = params(net.point_at(t))
        for name in pa:
            assert torch.allclose(point[name], (1 - t) * pa[name] + t * pb[name], atol=1e-6)
        # the forward pass at t is the base model run with those weights
        manual = tiny(5)
        manual.load_state_dict({**{k: (1 - t) * pa[k] + t * pb[k] for k in pa},
                                **dict(net.base.named_buffers())})
        net.eval(), manual.eval()
        assert torch.allclose(net(x, torch.tensor(t)), manual(x), atol=1e-5)


@pytest.mark.parametrize("curve", [Bezier, PolyChain])
@pytest.mark.parametrize("n", [3, 4, 5])
def test_curve_reproduces_its_ends_exactly(curve, n):
    net, a, b = make_curve(curve, n)
    for t, ref in ((0.0, a), (1.0, b)):
        point = params(net.point_at(t))
        assert all(torch.equal(point[k], v) for k, v in params(ref).items())


def test_point_at_is_an_ordinary_autoencoder_with_the_base_buffers():
    net, a, _ = make_curve()
    point = net.point_at(0.3)
    assert type(point) is Autoencoder
    assert list(point.state_dict()) == list(a.state_dict())
    assert all(torch.equal(v, dict(net.base.named_buffers())[k]) for k, v in point.named_buffers())
    point.state_dict()["encoder.4.running_mean"].add_(1)  # a copy: the curve is untouched
    assert not torch.equal(point.state_dict()["encoder.4.running_mean"], net.base.state_dict()["encoder.4.running_mean"])


def test_init_linear_puts_interior_bends_on_the_segment():
    net, a, b = make_curve(PolyChain, n=5)
    pa, pb = params(a), params(b)
    for k in range(1, 4):
        for name in pa:
            expected = pa[name] * (1 - k / 4) + pb[name] * (k / 4)
            assert torch.allclose(net.bends[k].get_parameter(name), expected, atol=1e-7)
    # a Bezier curve with its control point on the segment is the segment itself
    bez, a, b = make_curve(Bezier, n=3)
    mid = params(bez.point_at(0.3))
    assert all(torch.allclose(mid[k], 0.7 * v + 0.3 * params(b)[k], atol=1e-6) for k, v in params(a).items())


def test_fixed_bends_get_no_gradient_and_stay_bitwise_unchanged():
    net, a, b = make_curve(Bezier, n=3, fix_start=True, fix_end=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(trainable) == len(list(a.parameters()))  # only the middle bend
    opt = torch.optim.Adam(trainable, lr=1e-2)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    for _ in range(3):
        loss = (net(x) - x).abs().mean() + 1e-3 * net.sq_norm
        opt.zero_grad()
        loss.backward()
        opt.step()
    for bend in (0, 2):
        assert all(p.grad is None for p in net.bends[bend].parameters())
        assert all(torch.equal(v, before[f"bends.{bend}.{k}"]) for k, v in net.bends[bend].state_dict().items())
    assert not all(torch.equal(v, before[f"bends.1.{k}"]) for k, v in net.bends[1].state_dict().items())
    free = CurveNet(tiny(0), Bezier, 3, fix_start=False, fix_end=False)
    assert all(p.requires_grad for p in free.parameters())


def test_import_by_name_reports_every_mismatch():
    net = CurveNet(tiny(0), Bezier, 3)
    with pytest.raises(ValueError, match=r"encoder.0.weight: shape \(8, 3, 4, 4\) vs \(4, 3, 4, 4\)"):
        net.import_base(tiny(1, f=8), 0)
    other = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="missing encoder.0.weight.*unexpected 0.weight"):
        net.import_base(other, 0)


def test_import_matches_by_name_not_by_position():
    # the same parameters registered in another order (decoder first) still land name by name
    a = tiny(3)
    reordered = nn.Module()
    reordered.decoder = a.decoder
    reordered.encoder = a.encoder
    assert next(reordered.named_parameters())[0].startswith("decoder")
    net = CurveNet(tiny(0), PolyChain, 2)
    net.import_base(reordered, 0)
    assert all(torch.equal(net.bends[0].get_parameter(k), v) for k, v in params(a).items())


def test_weight_decay_term_is_the_squared_norm_of_theta_t():
    net, _, _ = make_curve(Bezier, n=4)
    net.bends[1].get_parameter("encoder.0.weight").data.add_(0.3)  # off the segment
    x = torch.rand(2, 3, 64, 64)
    for t in (0.1, 0.5, 0.9):
        net(x, torch.tensor(t))
        by_hand = sum((p.double() ** 2).sum() for p in net.point_at(t).parameters())
        assert net.sq_norm.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_forward_draws_a_fresh_t_per_call():
    net, _, _ = make_curve(Bezier, n=3)
    net.bends[1].get_parameter("decoder.0.bias").data.add_(1.0)
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(0)
    norms = set()
    for _ in range(5):
        net(x)
        norms.add(round(net.sq_norm.item(), 6))
    assert len(norms) == 5


# ----------------------------------------------------------------------------- update_bn

def test_update_bn_gives_the_dataset_mean_and_batch_averaged_unbiased_variance():
    torch.manual_seed(0)
    batches = [torch.randn(8, 2, 3, 3) * (i + 1) + i for i in range(4)]
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(2, momentum=0.3))
    model.eval()
    update_bn(batches, model)
    bn = model[1]
    per_channel = [b.transpose(0, 1).reshape(2, -1) for b in batches]
    mean = torch.stack([c.mean(1) for c in per_channel]).mean(0)
    var = torch.stack([c.var(1, unbiased=True) for c in per_channel]).mean(0)
    # dropout stayed off (the values above are undropped), BN stats are exact averages
    assert torch.allclose(bn.running_mean, mean, atol=1e-6)
    assert torch.allclose(bn.running_var, var, atol=1e-5)
    assert bn.momentum == 0.3 and not model.training and not bn.training  # restored
    # cap: only the first 2 batches, whatever follows
    update_bn(batches + [torch.full((8, 2, 3, 3), 1e3)], model, num_batches=2)
    mean2 = torch.stack([c.mean(1) for c in per_channel[:2]]).mean(0)
    assert torch.allclose(bn.running_mean, mean2, atol=1e-6)
    model.train()
    update_bn(batches, model)
    assert model.training and bn.training
    # statistics left non-finite by a diverged point do not leak into the next estimate
    bn.running_mean.fill_(float("nan"))
    bn.running_var.fill_(float("inf"))
    update_bn(batches, model)
    assert torch.allclose(bn.running_mean, mean, atol=1e-6) and torch.allclose(bn.running_var, var, atol=1e-5)


def test_connect_without_init_linear_keeps_the_template_inside_and_a_missing_end():
    a, b, template = tiny(0), tiny(1, "kaiming_normal"), tiny(2)
    net = connect(a, b, Bezier, 3, init_linear=False, template=template)
    assert all(torch.equal(net.bends[1].get_parameter(k), v) for k, v in params(template).items())
    half = connect(a, None, PolyChain, 2, template=template)  # no end given: it stays the template
    assert all(torch.equal(half.bends[1].get_parameter(k), v) for k, v in params(template).items())
