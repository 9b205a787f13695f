"""One set of weights evaluated the way every tool of this project evaluates it: BatchNorm
re-estimated on training batches, then the losses on the train and test splits (Garipov et al.,
NeurIPS 2018, Sec. 3 and their `eval_curve.py`); and the preamble every evaluation script shares.

Every evaluation of a set of weights (a point on a curve or a segment, a grid point of a plane, an
ensemble member) goes through `PointEvaluator`: load theta into one reusable module, re-estimate
BatchNorm on the same training batches, evaluate the requested metrics.

Example::
    >>> evaluator = PointEvaluator(curve.point_at(0), train_loader.ordered(), test_loader,
    ...                            {"loss": torch.nn.L1Loss()}, bn_batches=50)
    >>> evaluator(curve.weights(0.5))          # {"train_loss": ..., "test_loss": ...}
"""
import copy
import itertools

import torch
from torch import nn

from aemc import distributed, repair
from aemc.data import build_loaders
from aemc.files import RunDir
from aemc.losses import build_lpips, evaluation_losses, kl_divergence, psnr, reconstruction, split_output
from aemc.settings import Speed
from aemc.speed import accumulator_dtype, autocast, configure, prepare_model

VAE_OBJECTIVE = "loss_plus_beta_kl"  # a VAE's reconstruction loss + beta * KL (named "elbo_loss", beta 1, before)


@torch.no_grad()
def evaluate(model, loader, loss_fns, image_metrics=None, amp="none", on_batch=None, num_batches=None, beta=None):
    """Mean of each loss over all images of `loader` (its first `num_batches` batches when given;
    clean inputs, eval mode): {name: float}.

    A VAE-like model (its output: reconstruction, mean, log-variance) also gets "kl" (the KL term
    per pixel value, aemc.losses.kl_divergence) and "loss_plus_beta_kl" (loss_fns["loss"] + beta *
    kl, the run's objective without weight decay, with the posterior's mean as the code); `beta`,
    the run's, is then required. With beta = 1 and a likelihood's loss that would be a plug-in
    estimate of the negative ELBO; with an L1 or pyramid loss, or beta != 1, it is not one.

    `image_metrics` ({name: fn(output, input) -> one value per image}, e.g. LPIPS) are computed
    in the same pass and averaged over images (not over batches). With `amp` only the model's
    forward pass is in mixed precision; losses and metrics are computed in float32.
    `on_batch(x, out)` sees every batch and its (float32) reconstructions.
    """
    model.eval()
    fns = {**loss_fns, **(image_metrics or {})}
    sums = {name: torch.zeros((), device=loader.device, dtype=accumulator_dtype(loader.device)) for name in fns}
    count = 0
    for x in (loader if num_batches is None else itertools.islice(loader, num_batches)):
        count += len(x)
        with autocast(loader.device, amp):
            out, posterior = split_output(model(x))
        out = out.float()
        if on_batch is not None:
            on_batch(x, out)
        for name, fn in loss_fns.items():
            sums[name] += fn(out, x).detach() * len(x)
        for name, fn in (image_metrics or {}).items():
            sums[name] += fn(out, x).detach().to(sums[name].dtype).sum()
        if posterior is not None:  # a VAE: the KL term too, and the objective it makes with the reconstruction's
            if beta is None:
                raise ValueError("evaluating a VAE-like model needs the run's beta (its loss is loss + beta * KL)")
            kl = kl_divergence(*(v.float() for v in posterior), x[0].numel()).detach().to(sums["loss"].dtype)
            for name in ("kl", VAE_OBJECTIVE):
                sums.setdefault(name, torch.zeros_like(sums["loss"]))
            sums["kl"] += kl.sum()
            sums[VAE_OBJECTIVE] += beta * kl.sum() + loss_fns["loss"](out, x).detach() * len(x)
    return {name: (s / count).item() for name, s in sums.items()}


def parameter_vector(model):
    """All parameters of `model` (not its buffers) as one flat vector, detached."""
    return nn.utils.parameters_to_vector(model.parameters()).detach()


def weight_distance(a, b):
    """||w_b - w_a|| over all parameters, and ||w_a||."""
    wa, wb = parameter_vector(a), parameter_vector(b)
    return (wb - wa).norm().item(), wa.norm().item()


@torch.no_grad()
def output_difference(a, b, batches):
    """(max, mean) of |a(x) - b(x)| over all pixels of the batches, both models in eval mode (of
    their reconstructions, for VAEs)."""
    a.eval(), b.eval()
    peak, total, count = 0.0, 0.0, 0
    for x in batches:
        d = (reconstruction(a(x)) - reconstruction(b(x))).abs()
        peak, total, count = max(peak, d.max().item()), total + d.double().sum().item(), count + d.numel()
    return peak, total / count


@torch.no_grad()
def update_bn(batches, model, num_batches=None):
    """Re-estimate the BatchNorm running statistics of `model` over `batches`.

    Like `torch.optim.swa_utils.update_bn` (Izmailov et al. 2018; used by Garipov et al. 2018 at
    every point of a curve): each BN layer ends with the plain average over batches of the
    per-batch mean and of the per-batch unbiased variance. Unlike torch's version, only the BN
    layers are put in train mode; dropout and everything else stay in eval mode, so the statistics
    are those of the network that will be evaluated. The average is accumulated on the device
    (momentum 1 gives each batch's statistics, which are summed), so the pass never waits for the
    host. Modes, momenta and the BN buffers' layout are restored afterwards.

    batches: any iterable of tensors (or of tuples whose first item is the input), e.g. a loader.
    num_batches: use only the first `num_batches` batches (the same ones on every call when the
    iterable is deterministic).

    Example::
        >>> model = curve_net.point_at(0.5)
        >>> update_bn(train_loader, model, num_batches=50)
        >>> model.eval(); test_loss = evaluate(model, test_loader)
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    sums = {bn: (torch.zeros_like(bn.running_mean), torch.zeros_like(bn.running_var)) for bn in bns}
    model.eval()
    for bn in bns:
        bn.reset_running_stats()  # momentum 1 still multiplies the old value by 0: NaN would stay NaN
        bn.momentum = 1.0
        bn.train()
    seen = 0
    try:
        for i, batch in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            model(batch[0] if isinstance(batch, (list, tuple)) else batch)
            for bn in bns:
                sums[bn][0].add_(bn.running_mean)
                sums[bn][1].add_(bn.running_var)
            seen += 1
        for bn in bns:
            bn.reset_running_stats()
            if seen:
                bn.running_mean.copy_(sums[bn][0] / seen)
                bn.running_var.copy_(sums[bn][1] / seen)
                bn.num_batches_tracked.fill_(seen)
    finally:
        for bn in bns:
            bn.momentum = momenta[bn]
        for m, mode in was_training.items():
            m.train(mode)


class PointEvaluator:
    """Evaluates sets of weights of one architecture, always the same way.

    `template`: a module of the architecture (copied once; its parameters are overwritten for each
    point, so one module, and one compiled graph under --compile, serves a whole walk or grid).
    For each theta ({parameter name: tensor}): BatchNorm is re-estimated on `train_batches` (the
    first `bn_batches` of them, the same at every point), then every loss in `loss_fns` is measured
    on the train and the test batches and every metric in `image_metrics` (one value per image,
    e.g. LPIPS) on the test batches. `speed` (a Speed): mixed precision, channels_last, compile. With
    `samples`, the reconstructions of those images are returned too. With `repair_layers`, REPAIR
    (aemc.repair) can be applied after those layers at any point: `statistics(theta)` measures an
    end's, `__call__(theta, repair=targets)` restores them.
    """

    def __init__(self, template, train_batches, test_batches, loss_fns, image_metrics=None,
                 bn_batches=None, speed=Speed(), samples=None, repair_layers=None, prior=None,
                 train_eval_batches=None, beta=None):
        self.module = copy.deepcopy(template).to(train_batches.device)
        if repair_layers:
            repair.install(self.module, repair_layers)
        self.runner = prepare_model(self.module, speed)
        self.amp = speed.amp
        self.train_batches, self.test_batches = train_batches, test_batches
        self.loss_fns, self.image_metrics = loss_fns, image_metrics
        self.bn_batches, self.samples, self.prior = bn_batches, samples, prior
        self.train_eval_batches = train_eval_batches
        self.beta = beta  # a VAE's: its loss_plus_beta_kl is loss + beta * KL (required for a VAE)
        self.done = {}  # fingerprint of theta -> its results: a point two paths share is evaluated once

    @torch.no_grad()
    def load(self, theta):
        for name, p in self.module.named_parameters():
            p.copy_(theta[name])

    def estimate_bn(self):
        with autocast(self.train_batches.device, self.amp):
            update_bn(self.train_batches, self.runner, num_batches=self.bn_batches)

    def statistics(self, theta):
        """{repaired layer: (mean, std)} of that layer's output at theta (BatchNorm re-estimated,
        REPAIR off): the statistics an end contributes to REPAIR's targets."""
        self.load(theta)
        repair.disable(self.module)
        self.estimate_bn()
        return self.measure()

    def measure(self):
        with autocast(self.train_batches.device, self.amp):
            return repair.measure(self.runner, self.train_batches, self.bn_batches)

    def repair(self, targets):
        """REPAIR at the loaded point (aemc.repair): as many rounds of measuring and correcting the
        repaired layers as there are of them (round k fixes the k-th layer of a chain, whose inputs
        the earlier ones change), BatchNorm re-estimated on the corrected activations, and the
        rounds again for the layers after BatchNorm."""
        rounds = len(targets)
        for step in range(2 * rounds):
            repair.correct(self.module, self.measure(), targets)
            if step == rounds - 1:
                self.estimate_bn()

    def __call__(self, theta, on_test_batch=None, repair_targets=None):
        """{"train_<loss>": float, ..., "test_<metric>": float, ["recons": (K, 3, 64, 64) on the CPU]}.
        `on_test_batch(x, out)` sees every test batch and the point's reconstructions of it;
        `repair_targets` ({layer: (mean, std)}) applies REPAIR at this point (aemc.repair)."""
        plain = on_test_batch is None and repair_targets is None
        key = fingerprint(theta) if plain else None
        if key in self.done:  # e.g. a curve's ends, which are its segment's ends too
            return dict(self.done[key])
        self.load(theta)
        repair.disable(self.module)
        self.estimate_bn()
        if repair_targets is not None:
            self.repair(repair_targets)
        train = evaluate(self.runner, self.train_batches, self.loss_fns, amp=self.amp,
                         num_batches=self.train_eval_batches, beta=self.beta)
        test = evaluate(self.runner, self.test_batches, self.loss_fns, self.image_metrics, amp=self.amp,
                        on_batch=on_test_batch, beta=self.beta)
        result = {**{"train_" + k: v for k, v in train.items()}, **{"test_" + k: v for k, v in test.items()}}
        if self.samples is not None:
            with torch.no_grad(), autocast(self.train_batches.device, self.amp):
                result["recons"] = reconstruction(self.runner(self.samples)).float().cpu()
        if self.prior is not None:  # a VAE's decodings of fixed draws from its prior
            with torch.no_grad(), autocast(self.train_batches.device, self.amp):
                result["prior_decodes"] = self.module.decode(self.prior).float().cpu()
        if plain:
            self.done[key] = dict(result)
        return result


def fingerprint(theta):
    """A digest of a set of weights ({name: tensor}): equal exactly when every value is."""
    import hashlib
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(theta):
        digest.update(name.encode())
        digest.update(theta[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Session:
    """The preamble every evaluation script shares (eval_curve.py, plane.py, ensemble.py).

    Built at the script's start: joins torchrun's process group, checks and applies the speed
    settings, and builds LPIPS when asked (a missing backbone fails before any work). Once the
    script has loaded what it evaluates, `prepare` makes the output folder (it must be writable:
    that fails now, not after the work), the losses and the loaders, and `evaluator` the
    PointEvaluator of a template module.
    """

    def __init__(self, device, speed, evaluation):
        self.device = distributed.setup(device)
        configure(self.device, speed)
        self.speed, self.evaluation = speed, evaluation
        self.lpips = build_lpips(evaluation.lpips_weights, self.device) if evaluation.lpips else None

    @property
    def image_metrics(self):
        """Per-image test metrics: PSNR (dB, images in [0, 1]) always, LPIPS when asked."""
        return {"psnr": psnr, **({"lpips": self.lpips} if self.lpips is not None else {})}

    def prepare(self, data, loss, out_dir):
        """The output folder, the losses of `loss` (a Loss) and the loaders of `data` (a Data)."""
        if distributed.is_main():
            RunDir(out_dir)
        self.data, self.loss, self.out_dir = data, loss, out_dir
        self.loss_fns = evaluation_losses(loss, self.device)
        self.train_loader, self.test_loader = build_loaders(data, self.device, speed=self.speed)
        return self

    def evaluator(self, template, samples=None, image_metrics=True, repair_layers=None, prior=None):
        """A PointEvaluator of modules like `template` on this session's data, losses and speed
        (with the per-image test metrics unless `image_metrics` is off; REPAIR after `repair_layers`;
        decoding the latent codes `prior`, see prior_samples)."""
        return PointEvaluator(template, self.train_loader.ordered(), self.test_loader, self.loss_fns,
                              self.image_metrics if image_metrics else None, self.evaluation.bn_batches,
                              speed=self.speed, samples=samples, repair_layers=repair_layers, prior=prior,
                              train_eval_batches=self.evaluation.train_batches, beta=self.loss.beta)


@torch.no_grad()
def prior_samples(model, x, count, seed=0):
    """`count` fixed draws from N(0, I) in the latent space of a VAE-like model (one whose output on
    `x` is (reconstruction, mean, log-variance) and that has `decode(z)`), on x's device; None for
    an autoencoder. The same seed gives the same draws at every point of a path."""
    if not hasattr(model, "decode"):
        return None
    was_training = model.training
    model.eval()
    _, posterior = split_output(model.to(x.device)(x[:1]))
    model.train(was_training)
    if posterior is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, *posterior[0].shape[1:], generator=generator).to(x.device)
