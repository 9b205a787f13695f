"""The original project's convolutional autoencoder ("conv"), defined once.

Encoder (DCGAN-style discriminator body), for 64x64 images: 64 -> 32 -> 16 -> 8 -> 4 -> 1
spatially, channels f -> 2f -> 4f -> 8f -> 8f, then Linear(8f -> latent) + Tanh. Decoder:
Linear(latent -> 8f), then bilinear upsampling followed by ordinary 5x5 convolutions (instead of
transposed convolutions, which leave checkerboard artefacts), 1 -> 4 -> 8 -> 16 -> 32 -> 64,
ending in Tanh, so outputs live in [-1, 1] like the inputs. Convolutions have no bias
(normalisation follows most of them; with norm="none" they have one). At the defaults
(in_filters=64, latent_dim=128, in_channels=3, 64x64, BatchNorm) it has 17,944,512 parameters,
as the original. Other image sizes (a power of two from 16) take one stride-2 stage per halving
down to 4x4, widths doubling up to 8f.
"""
import math

import torch
from torch import nn

INITS = ("normal", "kaiming_normal", "kaiming_uniform")
LEAK = 0.2      # LeakyReLU slope, also the `a` of the kaiming inits
DROPOUT = 0.05


NORMS = ("batch", "group", "layer", "none")


def _act():
    return [nn.LeakyReLU(LEAK, inplace=True), nn.Dropout(DROPOUT)]


def norm_layer(kind, channels):
    """The normalisation after a convolution: BatchNorm, GroupNorm (8 groups, or gcd(channels, 8)
    when 8 does not divide the channels), "layer" (GroupNorm with one group: LayerNorm over channels
    and pixels), or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8) if channels >= 8 else 1, channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def check_image_size(name, image_size, smallest=16):
    """A power of two from `smallest`, or a ValueError saying which sizes `name` takes."""
    if image_size < smallest or image_size & (image_size - 1):
        raise ValueError(f"the {name} autoencoder takes square images whose side is a power of two from {smallest} "
                         f"(32, 64, ...), not {image_size}x{image_size}: use --arch mlp for any size")


class Autoencoder(nn.Module):
    def __init__(self, in_channels=3, in_filters=64, latent_dim=128, conv_init="normal", norm="batch",
                 image_size=64):
        super().__init__()
        if conv_init not in INITS:
            raise ValueError(f"conv_init must be one of {INITS}, got {conv_init!r}")
        check_image_size("conv", image_size)
        norm_layer(norm, 1)  # an unknown norm fails here, in one line
        f, bias = in_filters, norm == "none"
        self.config = dict(in_channels=in_channels, in_filters=in_filters, latent_dim=latent_dim,
                           conv_init=conv_init, norm=norm, image_size=image_size)
        widths = [f * 2 ** min(i, 3) for i in range(int(math.log2(image_size)) - 2)]  # 64: f, 2f, 4f, 8f

        def down(cin, cout):  # Conv4x4 stride 2 halves the resolution
            return [nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=bias), norm_layer(norm, cout), *_act()]

        def up_block(cin, cout, upsample):
            layers = [nn.Upsample(scale_factor=2, mode="bilinear")] if upsample else []
            return layers + [nn.Conv2d(cin, cout, 5, padding=2, bias=bias), norm_layer(norm, cout), *_act()]

        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, f, 4, stride=2, padding=1, bias=bias), *_act(),  # 64: 32x32
            *[m for cin, cout in zip(widths, widths[1:]) for m in down(cin, cout)],  # 64: 16, 8, 4
            nn.Conv2d(widths[-1], 8 * f, 4, stride=2, padding=0, bias=bias),       # 1x1
            nn.Flatten(),
            nn.Linear(8 * f, latent_dim), nn.Tanh(),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 8 * f), nn.LeakyReLU(LEAK, inplace=True),
            nn.Unflatten(1, (8 * f, 1, 1)),
            nn.Upsample(scale_factor=4, mode="bilinear"),                          # 4x4
            *up_block(8 * f, 8 * f, False),                                         # 64: 4, 8, 16, 32
            *[m for cin, cout in zip([8 * f] + widths[-2:0:-1], widths[-2::-1]) for m in up_block(cin, cout, True)],
            nn.Upsample(scale_factor=2, mode="bilinear"),                          # 64: 64x64
            nn.Conv2d(f, in_channels, 5, padding=2, bias=bias), nn.Tanh(),
        )
        init_weights(self, conv_init)

    def encode(self, x):   # (N, C, S, S) -> (N, latent_dim)
        return self.encoder(x)

    def decode(self, z):   # (N, latent_dim) -> (N, C, S, S) in [-1, 1]
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



def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
