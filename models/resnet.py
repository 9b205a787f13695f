"""A convolutional autoencoder with residual blocks ("resnet").

Encoder: a stride-2 stem, then per stage a residual block (two 3x3 convolutions with
normalisation, added to the block's input) followed by a stride-2 convolution that doubles the
width, down to 4x4; a Linear to the latent code. Decoder: the mirror image with bilinear
upsampling and 3x3 convolutions, ending in Tanh. The additions tie the permutation of a block's
output to that of its input: models.symmetry finds and keeps that tie.
"""
import math

from torch import nn

from models.autoencoder import LEAK, check_image_size, init_weights, norm_layer


class ResidualBlock(nn.Module):
    def __init__(self, channels, norm):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.norm1 = norm_layer(norm, channels)
        self.act = nn.LeakyReLU(LEAK)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.norm2 = norm_layer(norm, channels)

    def forward(self, x):
        return self.act(x + self.norm2(self.conv2(self.act(self.norm1(self.conv1(x))))))


class ResNetAutoencoder(nn.Module):
    def __init__(self, in_channels=3, in_filters=16, latent_dim=64, conv_init="kaiming_normal", norm="batch",
                 image_size=64):
        super().__init__()
        check_image_size("resnet", image_size)
        norm_layer(norm, 1)
        f, bias = in_filters, norm == "none"
        stages = int(math.log2(image_size)) - 3           # 64: 32 -> 16 -> 8 -> 4
        widths = [f * 2 ** min(i, 3) for i in range(stages + 1)]
        self.config = dict(in_channels=in_channels, in_filters=in_filters, latent_dim=latent_dim,
                           conv_init=conv_init, norm=norm, image_size=image_size)
        encoder = [nn.Conv2d(in_channels, f, 4, stride=2, padding=1, bias=bias), norm_layer(norm, f),
                   nn.LeakyReLU(LEAK)]
        for cin, cout in zip(widths, widths[1:]):
            encoder += [ResidualBlock(cin, norm), nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=bias),
                        norm_layer(norm, cout), nn.LeakyReLU(LEAK)]
        self.encoder = nn.Sequential(*encoder, nn.Flatten(), nn.Linear(widths[-1] * 16, latent_dim))
        decoder = [nn.Linear(latent_dim, widths[-1] * 16), nn.Unflatten(1, (widths[-1], 4, 4))]
        for cin, cout in zip(widths[::-1], widths[-2::-1]):
            decoder += [ResidualBlock(cin, norm), nn.Upsample(scale_factor=2, mode="bilinear"),
                        nn.Conv2d(cin, cout, 3, padding=1, bias=bias), norm_layer(norm, cout), nn.LeakyReLU(LEAK)]
        self.decoder = nn.Sequential(*decoder, nn.Upsample(scale_factor=2, mode="bilinear"),
                                     nn.Conv2d(f, in_channels, 3, padding=1), nn.Tanh())
        init_weights(self, conv_init)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x):
        return self.decoder(self.encoder(x))
