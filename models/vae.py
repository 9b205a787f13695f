"""A convolutional variational autoencoder ("vae").

The encoder of the conv autoencoder (without its Tanh) ends in two Linear heads, the posterior's
mean and log-variance; in training the code is the reparameterised sample mean + exp(logvar / 2) *
noise, in evaluation the mean. The decoder is the conv autoencoder's. `forward` returns
(reconstruction, mean, log-variance): the protocol of a VAE-like model (docs/architectures.md);
the loss adds beta * KL (aemc.losses.kl_divergence). The two heads' units are one set of latent
units: a permutation of them permutes both heads' outputs, which models.symmetry derives from the
graph (the mean and the scaled noise are added).
"""
import torch
from torch import nn

from models.autoencoder import Autoencoder


class VAE(nn.Module):
    def __init__(self, in_channels=3, in_filters=32, latent_dim=64, conv_init="normal", norm="batch", image_size=64):
        super().__init__()
        body = Autoencoder(in_channels, in_filters, latent_dim, conv_init, norm, image_size)
        self.config = dict(body.config)
        width = body.encoder[-2].in_features
        self.encoder = body.encoder[:-2]            # ... to the flattened features
        self.mean = nn.Linear(width, latent_dim)
        self.logvar = nn.Linear(width, latent_dim)
        self.decoder = body.decoder

    def encode(self, x):
        features = self.encoder(x)
        return self.mean(features), self.logvar(features)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x):
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.training else mean
        return self.decoder(z), mean, logvar
