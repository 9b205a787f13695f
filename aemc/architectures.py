"""Architectures: a factory's name and keyword arguments (aemc.settings.Architecture) -> a module.

Built-in factories are `models.ARCHITECTURES` (conv, resnet, vae, mlp). A user's own model is named
`package.module:factory`; its module is imported only when the command line names that same
factory (`--arch package.module:factory`, which calls `allow`): a checkpoint file never causes an
import, so loading one can never run code.

Example::
    >>> allow("my_models.tiny:build")          # what --arch my_models.tiny:build does
    >>> model = build(Architecture("my_models.tiny:build", {"width": 8}))
"""
import importlib
import inspect

from torch import nn

import models
from aemc.errors import UserError, warn
from aemc.settings import Architecture

_ALLOWED = set()  # user factories the command line named
_TOLD = set()     # the notes on units left in place, said once


def allow(name):
    """Let `build` import the user factory `name` (the command line named it)."""
    if name and name not in models.ARCHITECTURES:
        _ALLOWED.add(name)


def is_user(name):
    return name not in models.ARCHITECTURES


def factory(name):
    """The callable that builds architecture `name`."""
    if name in models.ARCHITECTURES:
        return models.ARCHITECTURES[name]
    module_name, colon, function = name.partition(":")
    if not colon or not module_name or not function:
        raise UserError(f"unknown architecture {name!r}: built in are {', '.join(models.ARCHITECTURES)}; a model of "
                        "your own is named package.module:factory")
    if name not in _ALLOWED:
        raise UserError(f"the model is built by {name}, code of your own: pass --arch {name} to import it "
                        "(a checkpoint never imports code by itself)")
    try:
        found = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--arch {name}: cannot import it ({type(e).__name__}: {e}); is the package on the "
                        "Python path (run from the folder that holds it)?")
    if not callable(found):
        raise UserError(f"--arch {name}: {function} is {_kind(found)}, not a function or class that builds a model")
    return found


def _kind(value):
    text = repr(value)
    return f"a {type(value).__name__}" + (f" ({text})" if len(text) <= 40 else "")


def accepted(name):
    """{keyword: default (or inspect.Parameter.empty)} of the factory's arguments."""
    return {k: p.default for k, p in inspect.signature(factory(name)).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def build(architecture):
    """A freshly initialised module of `architecture`. A module without a `config` dict gets one,
    the arguments it was built with (models.symmetry reads in_channels and image_size there)."""
    build_it = factory(architecture.name)
    try:
        module = build_it(**architecture.kwargs)
    except (ValueError, TypeError, RuntimeError) as e:  # arguments it refuses (torch: a negative size, ...)
        raise UserError(f"cannot build {architecture.name} with {architecture.kwargs}: {_first_line(e)}")
    # any other exception a factory of the user's own raises keeps its traceback: it points into their code
    if not isinstance(module, nn.Module):
        raise UserError(f"{architecture.name} returned {_kind(module)}, not a torch.nn.Module")
    if not isinstance(getattr(module, "config", None), dict):
        module.config = dict(architecture.kwargs)
    return module


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_output(model, images, name):
    """Run `model` once on a few `images` (N, C, H, W), in eval mode, without gradients and without
    touching the random state, and refuse in one line a model whose reconstruction does not have
    the images' shape: that would otherwise fail mid-training with a broadcast error, or train
    on a broadcast loss. A CurveNet is checked at its midpoint."""
    import torch

    from aemc.losses import reconstruction
    devices = [images.device] if images.device.type == "cuda" else []
    was_training = model.training
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            at = (torch.tensor(0.5, device=images.device),) if hasattr(model, "point_at") else ()
            out = model(images, *at)
            shape = tuple(reconstruction(out).shape)
        except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise UserError(f"the model {name} fails on a batch of images of shape {tuple(images.shape)} "
                            f"({type(e).__name__}: {_first_line(e)})")
        finally:
            model.train(was_training)
    if shape != tuple(images.shape):
        raise UserError(f"the model {name} returns {shape} for images of shape {tuple(images.shape)}: an "
                        "autoencoder must return images of its input's shape (a VAE: (reconstruction, mean, "
                        "log-variance))")


def resolve(name, kwargs, data_shape):
    """The Architecture of factory `name` with `kwargs` (given by the user), the image channels
    and size of the data (C, H, W) where the factory takes them, and every other argument at the
    factory's default, so that a checkpoint says everything that built its model."""
    params = accepted(name)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise UserError(f"{name} takes no {', '.join(unknown)} (it takes {', '.join(params) or 'no arguments'})")
    full = {k: v for k, v in params.items() if v is not inspect.Parameter.empty}
    channels, height, width = data_shape
    for key, value in (("in_channels", channels), ("image_size", height)):
        if key in params:
            if key in kwargs and kwargs[key] != value:
                raise UserError(f"--{key} {kwargs[key]}: the data's images have {value}")
            full[key] = value
    if height != width and "image_size" in params:
        raise UserError(f"{name} takes square images; the data's are {height}x{width}")
    full.update(kwargs)
    return Architecture(name, full)


def permutation_spec(model):
    """models.symmetry.permutation_spec of `model`, a model it cannot run said in one line, and the
    units it leaves in place (it could not prove them permutable) named in one line."""
    from models.symmetry import permutation_spec as derive
    try:
        spec = derive(model)
    except ValueError as e:
        raise UserError(str(e))
    if spec.fixed and tuple(spec.fixed) not in _TOLD:  # once per process
        _TOLD.add(tuple(spec.fixed))
        warn(f"note: {len(spec.fixed)} layers' units are not permuted: " + "; ".join(spec.fixed))
    return spec
