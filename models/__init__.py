"""Model definitions: the autoencoder (written once), curves over any module, the symmetry derivation.

Architectures are plain `nn.Module`s built by a factory from plain keyword arguments;
`ARCHITECTURES` names the built-in factories, and a checkpoint records the name and the kwargs.
"""
from models.autoencoder import Autoencoder

ARCHITECTURES = {"conv": Autoencoder}  # the original's DCGAN-style conv autoencoder (the default)


def build(name, kwargs):
    """The module a built-in factory makes from `kwargs`."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; built in: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](**kwargs)
