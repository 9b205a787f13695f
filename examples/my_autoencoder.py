"""A model of your own, used through --arch (docs/architectures.md):

    python train.py --dir runs/mine-1 --seed 1 --arch examples.my_autoencoder:build --arch_kwargs '{"width": 16}'
    python train.py --dir runs/mine-2 --seed 2 --arch examples.my_autoencoder:build --arch_kwargs '{"width": 16}'
    python train.py --dir runs/mine-curve --curve Bezier --num_bends 3 --fix_start --fix_end \\
        --init_start runs/mine-1/checkpoint-100.pt --init_end runs/mine-2/checkpoint-100.pt \\
        --arch examples.my_autoencoder:build
    python eval_curve.py --ckpt runs/mine-curve/checkpoint-100.pt --arch examples.my_autoencoder:build

Any function (or class) that returns an nn.Module works: `forward(x)` takes images (N, C, H, W) in
[-1, 1] and returns their reconstruction, or, for a VAE-like model, (reconstruction, mean,
log-variance) with a `decode(z)` method. Arguments named `in_channels` and `image_size` are filled
in from the data; the others come from --arch_kwargs, else from their defaults. The checkpoint
records "examples.my_autoencoder:build" and the arguments; loading it imports this file only when
the command line names it with --arch.

This one: GroupNorm (no BatchNorm statistics: points along a path need no re-estimation), SiLU,
a Flatten into a Linear bottleneck, and upsampling by interpolation.
"""
from torch import nn


def build(in_channels=3, image_size=64, width=16, latent_dim=32, groups=4):
    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
    side = image_size // 4

    def block(c_in, c_out, stride):
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU()]

    encoder = nn.Sequential(*block(in_channels, width, 2), *block(width, 2 * width, 2), nn.Flatten(),
                            nn.Linear(2 * width * side * side, latent_dim))
    decoder = nn.Sequential(nn.Linear(latent_dim, 2 * width * side * side), nn.Unflatten(1, (2 * width, side, side)),
                            nn.Upsample(scale_factor=2), *block(2 * width, width, 1), nn.Upsample(scale_factor=2),
                            nn.Conv2d(width, in_channels, 3, padding=1), nn.Tanh())
    return nn.Sequential(encoder, decoder)
