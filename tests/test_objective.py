"""The gradient matrix (issue 27): for every built-in architecture and the example model, an endpoint
and a Bezier and a PolyChain curve, the mae and the Laplacian-pyramid loss, and for the VAE beta 0
and 4, one training step of the library's own loop (trainer.train_one_epoch with the objective and
optimizer train.py builds from the run's settings) moves the parameters by exactly the gradient of
the objective written here from its formula:

    L1 or the pyramid loss  +  beta * KL(N(mu, exp(logvar)) || N(0, I)) / (C H W)  +  0.5 * wd * ||theta(t)||^2

(theta(t) = sum_k c_k(t) theta_k with the Bernstein / hat coefficients, for a curve; an endpoint's
theta). The step is plain SGD (lr 1, no momentum), in float64, so the step is the gradient (with
the optimizer's coupled weight decay for an endpoint) and round-off stays near 1e-12: the 1e-5
relative bound holds on any CPU. The formulas below are written from the papers, not by calling
aemc.losses or aemc.objective."""
import copy
from math import comb

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import trainer
from aemc import architectures
from aemc.data.loader import to_float
from aemc.data.synthetic import synthetic_faces
from aemc.objective import Objective, training_objective
from aemc.settings import Loss, Optimizer, Run, Training
from models.curves import connect

USER = "examples.my_autoencoder:build"
# name: (factory, its arguments at a tiny width, the data's (channels, size))
CASES = {
    "conv": ("conv", dict(in_filters=2, latent_dim=4, norm="batch"), (3, 16)),
    "conv-group": ("conv", dict(in_filters=2, latent_dim=4, norm="group"), (3, 16)),
    "conv-layer": ("conv", dict(in_filters=2, latent_dim=4, norm="layer"), (3, 16)),
    "conv-none": ("conv", dict(in_filters=2, latent_dim=4, norm="none"), (3, 16)),
    "resnet": ("resnet", dict(in_filters=2, latent_dim=4), (3, 16)),
    "vae": ("vae", dict(in_filters=2, latent_dim=4), (3, 16)),
    "mlp": ("mlp", dict(hidden=8, latent_dim=4), (1, 16)),
    "user": (USER, dict(width=2, latent_dim=4, groups=2), (1, 16)),
}
MODES = ("endpoint", "Bezier", "PolyChain")
WD, T, LEVELS, SEED = 0.05, 0.3, 3, 7  # a decay large enough to show in the gradient; t of the curve's step
BOUND = 1e-5


# ----------------------------------------------------------------------------- the formulas

def l1(out, x):
    return (out - x).abs().mean()


def _blur(img):
    """5x5 binomial blur ([1 4 6 4 1] / 16 in each direction), reflect padding 2, channel by channel."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=img.dtype) / 16
    kernel = (k1[:, None] * k1[None, :]).expand(img.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(img, (2, 2, 2, 2), mode="reflect"), kernel, groups=img.shape[1])


def _expand(img):
    """2x upsampling: zeros between the samples, then the blur with 4 times the kernel."""
    n, c, h, w = img.shape
    up = torch.zeros(n, c, 2 * h, 2 * w, dtype=img.dtype)
    up[:, :, ::2, ::2] = img
    return 4 * _blur(up)


def pyramid_l1(out, x, levels=LEVELS):
    """Sum over `levels` band-pass levels of the L1 between the images' Laplacian pyramids (Burt and
    Adelson: band = image - expand(reduce(image)), reduce = blur then every other pixel); no low-pass term."""
    total = 0
    for _ in range(levels):
        down_out, down_x = _blur(out)[:, :, ::2, ::2], _blur(x)[:, :, ::2, ::2]
        total = total + l1(out - _expand(down_out), x - _expand(down_x))
        out, x = down_out, down_x
    return total


def kl_per_value(mean, logvar, x):
    """KL(N(mean, exp(logvar)) || N(0, I)) of each image, divided by its number of values; batch mean."""
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(1)
    return (kl / x[0].numel()).mean()


def coefficients(mode, t, n=3):
    if mode == "Bezier":  # Bernstein polynomials
        return [comb(n - 1, k) * t ** k * (1 - t) ** (n - 1 - k) for k in range(n)]
    return [max(0.0, 1 - abs(t * (n - 1) - k)) for k in range(n)]  # PolyChain: hat functions


def reference_gradient(model, mode, x, loss_name, beta, terms=("recon", "kl", "wd")):
    """{trainable parameter name: d objective / d parameter}, the objective written from its formula,
    the model's random draws (dropout, a VAE's sample) seeded as the step's were."""
    model = copy.deepcopy(model)
    if mode == "endpoint":
        params = {n: p for n, p in model.named_parameters()}
        theta = params
        torch.manual_seed(SEED)
        output = model(x)
    else:  # theta(t) from the bends (the fixed ends are constants), the base run at it
        c = coefficients(mode, T)
        names = model.names
        params = {f"bends.1.{n}": p for n, p in model.bends[1].named_parameters()}
        theta = {n: sum(ck * bend.get_parameter(n) for ck, bend in zip(c, model.bends)) for n in names}
        torch.manual_seed(SEED)
        output = functional_call(model.base, theta, (x,))
    out, posterior = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
    objective = 0
    if "recon" in terms:
        objective = objective + (l1(out, x) if loss_name == "mae" else pyramid_l1(out, x))
    if "kl" in terms and posterior is not None:
        objective = objective + beta * kl_per_value(*posterior, x)
    if "wd" in terms:
        objective = objective + 0.5 * WD * sum((v ** 2).sum() for v in theta.values())
    grads = torch.autograd.grad(objective, list(params.values()))
    return dict(zip(params, grads))


# ----------------------------------------------------------------------------- the library's step

class OneBatch:
    """A loader of one float64 batch (trainer.train_one_epoch's interface)."""

    def __init__(self, x):
        self.x, self.device = x, x.device

    def __len__(self):
        return 1

    def shares(self, start):
        yield self.x, len(self.x)

    def __iter__(self):  # as an evaluation's loader
        yield self.x


def settings_for(loss_name, beta):
    return Run(loss=Loss(loss_function=loss_name, num_filters=LEVELS, beta=beta),
               optim=Optimizer(optim_name="SGD", lr=1.0, momentum=0.0, wd=WD), training=Training(noise_std=0.0))


def library_step(model, x, settings, curve):
    """One step of the library's loop, as train.py sets it up; returns -(change of each trainable
    parameter), which plain SGD with lr 1 makes the gradient the optimizer applied."""
    model = copy.deepcopy(model)
    objective = training_objective(settings, curve=curve, device=x.device)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = trainer.make_optimizer(settings.optim, list(trainable.values()), objective.optimizer_weight_decay,
                                       x.device)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    torch.manual_seed(SEED)
    trainer.train_one_epoch(model, OneBatch(x), optimizer, objective, settings, verbose=False)
    return {n: before[n] - p.detach() for n, p in trainable.items()}


def build(case, mode):
    name, kwargs, (channels, size) = CASES[case]
    architectures.allow(name)
    arch = architectures.resolve(name, kwargs, (channels, size, size))
    torch.manual_seed(0)
    ends = [architectures.build(arch).double() for _ in range(2)]
    x = to_float(synthetic_faces(4, seed=1, size=size)).double()
    x = x.mean(1, keepdim=True) if channels == 1 else x
    if mode == "endpoint":
        return ends[0], x
    curve = connect(ends[0], ends[1], mode, 3).double()
    with torch.no_grad():  # the middle bend off the segment
        for p in curve.bends[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    curve.t_sampler = lambda device: torch.tensor(T, dtype=torch.float64, device=device)
    return curve, x


def relative(a, b):
    """||a - b|| / ||b|| over all parameters together."""
    diff = sum(((a[n] - b[n]) ** 2).sum() for n in b) ** 0.5
    return (diff / sum((b[n] ** 2).sum() for n in b) ** 0.5).item()


MATRIX = [(case, mode, loss, beta) for case in CASES for mode in MODES for loss in ("mae", "laplacian")
          for beta in ((0.0, 4.0) if case == "vae" else (1.0,))]
FAST = {("conv", "endpoint", "mae", 1.0), ("conv-group", "Bezier", "laplacian", 1.0),
        ("resnet", "PolyChain", "mae", 1.0), ("vae", "Bezier", "mae", 4.0), ("vae", "endpoint", "laplacian", 4.0),
        ("mlp", "PolyChain", "laplacian", 1.0), ("user", "Bezier", "mae", 1.0)}


@pytest.mark.parametrize("case,mode,loss,beta", [
    pytest.param(*row, marks=() if row in FAST else pytest.mark.slow) for row in MATRIX])
def test_a_training_step_follows_the_gradient_of_the_objectives_formula(case, mode, loss, beta):
    model, x = build(case, mode)
    settings = settings_for(loss, beta)
    got = library_step(model, x, settings, curve=mode != "endpoint")
    expected = reference_gradient(model, mode, x, loss, beta)
    assert set(got) == set(expected)
    assert relative(got, expected) < BOUND, {n: relative({n: got[n]}, {n: expected[n]}) for n in expected}
    # every term shows in the gradient far above the bound: a step that dropped one would fail above
    for term in ("wd",) + (("kl",) if case == "vae" and beta > 0 else ()):
        without = reference_gradient(model, mode, x, loss, beta, terms={"recon", "kl", "wd"} - {term})
        assert relative(without, expected) > 100 * BOUND, term


@pytest.mark.parametrize("mode", ["Bezier", "PolyChain"])
def test_beta_changes_a_vae_curves_gradient(mode):
    """Bug 1: a VAE curve's gradient was the same for every beta (its KL term was dropped)."""
    model, x = build("vae", mode)
    steps = {beta: library_step(model, x, settings_for("mae", beta), curve=True) for beta in (0.0, 4.0)}
    assert relative(steps[0.0], steps[4.0]) > 1e-3
    assert relative(steps[4.0], reference_gradient(model, mode, x, "mae", 4.0)) < BOUND


def test_the_objective_has_no_defaults_and_refuses_other_settings():
    """Forgetting beta, the loss or the decay is an error, not a silent 1.0; so is training with other
    settings than the objective's."""
    with pytest.raises(TypeError):
        Objective(reconstruction=torch.nn.L1Loss(), weight_decay=0.0, curve=False, settings=Run())  # no beta
    with pytest.raises(TypeError):
        training_objective(Run(), device="cpu")  # endpoint or curve?
    import inspect
    for fn in (trainer.train_one_epoch, trainer.fit, training_objective):
        params = inspect.signature(fn).parameters
        assert not {"beta", "curve_wd", "noise_std", "loss_fn", "amp", "epochs"} & set(params), fn.__name__
    objective = training_objective(settings_for("mae", 4.0), curve=False, device="cpu")
    model, x = build("vae", "endpoint")
    with pytest.raises(ValueError, match="other settings"):
        trainer.train_one_epoch(model, OneBatch(x), torch.optim.SGD(model.parameters(), lr=0.0), objective,
                                settings_for("mae", 1.0), verbose=False)
    with pytest.raises(ValueError, match="theta"):  # a curve's objective without the sampled point's norm
        training_objective(Run(), curve=True, device="cpu")(x, x)


def test_the_evaluation_reports_loss_plus_beta_kl_with_the_runs_beta(tmp_path):
    """The evaluation's VAE metric is the reconstruction + beta * KL of the run's beta (it was always
    beta 1, named elbo_loss); a VAE evaluated without beta is an error; old reports read back renamed."""
    import json

    from aemc.evaluation import evaluate
    from aemc.reports import read_walks
    model, x = build("vae", "endpoint")
    model.eval()
    with torch.no_grad():
        _, mean, logvar = model(x)  # evaluation codes with the posterior's mean
        l1_value, kl = l1(model(x)[0], x).item(), kl_per_value(mean, logvar, x).item()
    got = evaluate(model, OneBatch(x), {"loss": torch.nn.L1Loss()}, beta=4.0)
    # the evaluation computes the KL in float32: 1e-5 is a hundred times its round-off on these few values
    assert got["kl"] == pytest.approx(kl, rel=1e-5) and kl > 0
    assert got["loss_plus_beta_kl"] == pytest.approx(l1_value + 4.0 * kl, rel=1e-5)
    assert 4.0 * kl > 10 * 1e-5 * l1_value  # beta's share is ten times the bound: a beta of 1 would fail
    assert "elbo_loss" not in got
    with pytest.raises(ValueError, match="beta"):
        evaluate(model, OneBatch(x), {"loss": torch.nn.L1Loss()})
    old = {"loss": "mae", "paths": {"segment": {"path": {"kind": "segment"}, "test_elbo_loss": [0.3, 0.4],
                                                "barriers": {"test_elbo_loss": {"barrier_mean_ends": 0.1}}}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    report = read_walks(str(tmp_path / "old.json"))
    (entry,) = report.paths.values()
    assert entry["test_loss_plus_beta_kl"] == [0.3, 0.4] and "test_elbo_loss" not in entry
    assert entry["barriers"]["test_loss_plus_beta_kl"]["barrier_mean_ends"] == 0.1
    assert report.report["beta"] == 1.0  # what the old reports computed it with
