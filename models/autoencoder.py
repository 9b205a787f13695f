"""The convolutional autoencoder for 64x64 images, defined once.

Encoder (DCGAN-style discriminator body): 64 -> 32 -> 16 -> 8 -> 4 -> 1 spatially, channels
f -> 2f -> 4f -> 8f -> 8f, then Linear(8f -> latent) + Tanh. Decoder: Linear(latent -> 8f), then
bilinear upsampling followed by ordinary 5x5 convolutions (instead of transposed convolutions,
which leave checkerboard artefacts), 1 -> 4 -> 8 -> 16 -> 32 -> 64, ending in Tanh, so outputs
live in [-1, 1] like the inputs. Convolutions have no bias (BatchNorm follows most of them).
At the defaults (in_filters=64, latent_dim=128, in_channels=3) it has 17,944,512 parameters.
"""
import inspect

import torch
from torch import nn

INITS = ("normal", "kaiming_normal", "kaiming_uniform")
LEAK = 0.2      # LeakyReLU slope, also the `a` of the kaiming inits
DROPOUT = 0.05


def _act():
    return [nn.LeakyReLU(LEAK, inplace=True), nn.Dropout(DROPOUT)]


class Autoencoder(nn.Module):
    def __init__(self, in_channels=3, in_filters=64, latent_dim=128, conv_init="normal"):
        super().__init__()
        if conv_init not in INITS:
            raise ValueError(f"conv_init must be one of {INITS}, got {conv_init!r}")
        f = in_filters
        self.config = dict(in_channels=in_channels, in_filters=in_filters,
                           latent_dim=latent_dim, conv_init=conv_init)

        def down(cin, cout):  # Conv4x4 stride 2 halves the resolution
            return [nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(cout), *_act()]

        def up_block(cin, cout, upsample):
            layers = [nn.Upsample(scale_factor=2, mode="bilinear")] if upsample else []
            return layers + [nn.Conv2d(cin, cout, 5, padding=2, bias=False),
                             nn.BatchNorm2d(cout), *_act()]

        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, f, 4, stride=2, padding=1, bias=False), *_act(),  # 32x32
            *down(f, 2 * f), *down(2 * f, 4 * f), *down(4 * f, 8 * f),              # 16, 8, 4
            nn.Conv2d(8 * f, 8 * f, 4, stride=2, padding=0, bias=False),             # 1x1
            nn.Flatten(),
            nn.Linear(8 * f, latent_dim), nn.Tanh(),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 8 * f), nn.LeakyReLU(LEAK, inplace=True),
            nn.Unflatten(1, (8 * f, 1, 1)),
            nn.Upsample(scale_factor=4, mode="bilinear"),                          # 4x4
            *up_block(8 * f, 8 * f, False), *up_block(8 * f, 4 * f, True),          # 4, 8
            *up_block(4 * f, 2 * f, True), *up_block(2 * f, f, True),               # 16, 32
            nn.Upsample(scale_factor=2, mode="bilinear"),                          # 64x64
            nn.Conv2d(f, in_channels, 5, padding=2, bias=False), nn.Tanh(),
        )
        init_weights(self, conv_init)

    def encode(self, x):   # (N, C, 64, 64) -> (N, latent_dim)
        return self.encoder(x)

    def decode(self, z):   # (N, latent_dim) -> (N, C, 64, 64) in [-1, 1]
        return self.decoder(z)

    def forward(self, x):
        return self.decoder(self.encoder(x))


@torch.no_grad()
def init_weights(model, scheme="normal"):
    """Initialise every convolution and BatchNorm layer (Linear layers keep PyTorch's default).

    normal: conv weights ~ N(0, 0.02) (DCGAN); kaiming_*: He init with a=0.2 for LeakyReLU.
    BatchNorm: weight ~ N(1, 0.02), bias 0, for every scheme.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if scheme == "normal":
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif scheme == "kaiming_normal":
                nn.init.kaiming_normal_(m.weight, a=LEAK, nonlinearity="leaky_relu")
            elif scheme == "kaiming_uniform":
                nn.init.kaiming_uniform_(m.weight, a=LEAK, nonlinearity="leaky_relu")
            else:
                raise ValueError(f"unknown init scheme {scheme!r}")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


_DEFAULTS = inspect.signature(Autoencoder.__init__).parameters
# the original architecture, as the signature above gives it (17,944,512 parameters)
ARCH_DEFAULTS = {k: _DEFAULTS[k].default for k in ("in_channels", "in_filters", "latent_dim")}
INIT_DEFAULT = _DEFAULTS["conv_init"].default


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
