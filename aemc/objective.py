"""A batch's training objective, computed in one place for every training script and mode.

    objective = reconstruction(output, clean image)                        (mae or laplacian, per pixel value)
              + beta * KL(q(z | x) || N(0, I)) / (C * H * W)                 when the model returns a posterior
              + 0.5 * wd * ||theta(t)||^2                                    for a curve: the sampled point's
                                                                              parameters (Garipov et al. 2018)

An endpoint's weight decay is the optimizer's own (`optimizer_weight_decay`): Adam's and SGD's
coupled decay adds wd * theta to the gradient, the gradient of the same 0.5 * wd * ||theta||^2. A
curve's optimizer has none (it would decay the bends, not the point). `training_objective` builds
the objective from the run's typed settings; nothing here has a default for beta, the loss or the
weight decay, so a forgotten one is an error rather than a silent 1.0.

Example::
    >>> objective = training_objective(run, curve=False, device=device)
    >>> terms = objective(model(noisy), x)      # Terms(total, loss, kl, reg); total is what is minimised
"""
from typing import NamedTuple, Optional

import torch

from aemc.losses import build_loss, kl_divergence, split_output


class Terms(NamedTuple):
    total: torch.Tensor            # what the step minimises
    loss: torch.Tensor             # the reconstruction loss (what is reported as the training loss)
    kl: Optional[torch.Tensor]     # the KL term per pixel value (before beta), when the model has a posterior
    reg: Optional[torch.Tensor]    # 0.5 * wd * ||theta(t)||^2, for a curve


def _full(t):
    """Half-precision tensors (mixed-precision forward passes) in float32; float32 and float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class Objective:
    """reconstruction + beta * KL (+ 0.5 * wd * ||theta(t)||^2 for a curve); see the module docstring.

    `settings` is the run (aemc.settings.Run) it was built from; the training loop checks that it
    trains with the same run's settings."""

    def __init__(self, *, reconstruction, beta, weight_decay, curve, settings):
        self.reconstruction, self.beta, self.weight_decay, self.curve = reconstruction, beta, weight_decay, curve
        self.settings = settings

    @property
    def optimizer_weight_decay(self):
        """The weight decay the optimizer applies: the run's for an endpoint, none for a curve (its
        decay is the explicit term of the sampled point)."""
        return 0.0 if self.curve else self.weight_decay

    def __call__(self, output, target, sq_norm=None):
        """The terms for a model's `output` (a reconstruction, or (reconstruction, mean,
        log-variance)) of the clean images `target`; `sq_norm`: ||theta(t)||^2 of the point a
        curve's forward pass sampled (CurveNet.sq_norm), required for a curve."""
        out, posterior = split_output(output)
        loss = self.reconstruction(_full(out), target)
        total, kl, reg = loss, None, None
        if posterior is not None:
            kl = kl_divergence(*(_full(v) for v in posterior), target[0].numel()).mean()
            total = total + self.beta * kl
        if self.curve:
            if sq_norm is None:
                raise ValueError("a curve's objective needs ||theta(t)||^2 of the sampled point (CurveNet.sq_norm)")
            reg = 0.5 * self.weight_decay * sq_norm
            total = total + reg
        return Terms(total, loss, kl, reg)

    def check(self, settings):
        """Refuse to train with other settings than the ones the objective was built from."""
        if settings != self.settings:
            raise ValueError("the training objective was built from other settings than the run's")


def training_objective(settings, *, curve, device):
    """The objective of the run `settings` (an aemc.settings.Run): its loss (settings.loss:
    loss_function, num_filters, beta) and weight decay (settings.optim.wd); `curve`: whether the
    trained model is a curve (its decay then is 0.5 * wd * ||theta(t)||^2 of the sampled point)."""
    loss = settings.loss
    return Objective(reconstruction=build_loss(loss.loss_function, loss.num_filters).to(device), beta=loss.beta,
                     weight_decay=settings.optim.wd, curve=curve, settings=settings)
