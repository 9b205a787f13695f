"""A fully connected autoencoder for small images ("mlp"), e.g. 784-512-32-512-784 on 28x28 grey.

Flatten, Linear + ReLU to `hidden`, Linear to the latent code, Linear + ReLU back to `hidden`,
Linear to the pixels, Tanh, and back to (C, H, W): any image size.
"""
from torch import nn


class MLPAutoencoder(nn.Module):
    def __init__(self, in_channels=1, image_size=28, hidden=512, latent_dim=32):
        super().__init__()
        pixels = in_channels * image_size * image_size
        self.config = dict(in_channels=in_channels, image_size=image_size, hidden=hidden, latent_dim=latent_dim)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, pixels), nn.Tanh(),
                                     nn.Unflatten(1, (in_channels, image_size, image_size)))

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x):
        return self.decoder(self.encoder(x))
