"""Model definitions: the autoencoder (written once), curves over any module, the symmetry derivation.

Architectures are plain `nn.Module`s built by a factory from plain keyword arguments;
`ARCHITECTURES` names the built-in factories, and a checkpoint records the name and the kwargs.
"""
from models.autoencoder import Autoencoder
from models.mlp import MLPAutoencoder
from models.resnet import ResNetAutoencoder
from models.vae import VAE

ARCHITECTURES = {
    "conv": Autoencoder,          # the original's DCGAN-style conv autoencoder (the default)
    "resnet": ResNetAutoencoder,  # residual blocks
    "vae": VAE,                   # a variational autoencoder: forward returns (reconstruction, mean, log-variance)
    "mlp": MLPAutoencoder,        # fully connected, any image size
}

