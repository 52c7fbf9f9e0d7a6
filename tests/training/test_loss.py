"""Personalization loss terms: reconstruction at two resolutions, density regularisation, LPIPS, ArcFace."""
import math
import urllib.error

import numpy as np
import pytest
import torch

from training.arcface import IRSE50
from training.dataset import mirror_camera
from training.loss import LPIPSUnavailable, PersonalizationLoss, identity_loss, make_lpips, mirrored_cameras


class StubG(torch.nn.Module):
    """Minimal generator: fixed renders; density = sum of coordinates (so its L1 reg is known)."""

    def __init__(self, image, image_raw, density_reg=0.25, p_dist=0.004):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones([]))
        self.image, self.image_raw = image, image_raw
        self.rendering_kwargs = dict(density_reg=density_reg, density_reg_p_dist=p_dist, reg_type='l1',
                                     avg_camera_pivot=[0, 0, 0.2], avg_camera_radius=2.7)
        self.calls = []

    def synthesis(self, ws, c, neural_rendering_resolution=None, noise_mode='random'):
        self.calls.append((neural_rendering_resolution, noise_mode))
        n = ws.shape[0]
        return {'image': self.image[:n] * self.scale, 'image_raw': self.image_raw[:n] * self.scale,
                'image_depth': torch.zeros(n, 1, neural_rendering_resolution, neural_rendering_resolution)}

    def sample_mixed(self, coordinates, directions, ws, noise_mode='random'):
        return {'sigma': coordinates.sum(dim=-1, keepdim=True) * self.scale}


def _images(n=2, res=32, raw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, res, res, generator=g) * 2 - 1, torch.rand(n, 3, raw, raw, generator=g) * 2 - 1


def _downsampled(images, size):
    """Antialiased bilinear resizing as PIL computes it (the reference EG3D's 'antialiased' filter follows)."""
    import PIL.Image
    out = [[np.asarray(PIL.Image.fromarray(channel.numpy(), mode='F').resize((size, size), PIL.Image.BILINEAR))
            for channel in image] for image in images]
    return torch.from_numpy(np.array(out))


def test_reconstruction_is_mse_at_both_resolutions():
    real, _ = _images(seed=0)
    fake, fake_raw = _images(seed=1)
    G = StubG(fake, fake_raw)
    loss_fn = PersonalizationLoss(torch.device('cpu'), lpips_net='none')
    with torch.no_grad():
        total, terms, _ = loss_fn(G, real, torch.zeros(2, 25), torch.zeros(2, 3, 4), neural_rendering_resolution=8)
    assert torch.allclose(terms['mse'], (fake - real).square().mean())
    assert torch.allclose(terms['mse_raw'], (fake_raw - _downsampled(real, 8)).square().mean())
    assert torch.allclose(total, terms['mse'] + terms['mse_raw'])
    assert G.calls == [(8, 'const')] and set(terms) == {'mse', 'mse_raw'}


def test_perfect_render_has_zero_reconstruction_loss():
    real, _ = _images()
    real_raw = _downsampled(real, 8)
    loss_fn = PersonalizationLoss(torch.device('cpu'), lpips_net='alex-random')
    total, terms, _ = loss_fn(StubG(real, real_raw), real, torch.zeros(2, 25), torch.zeros(2, 3, 4), 8)
    assert set(terms) == {'mse', 'mse_raw', 'lpips', 'lpips_raw'}
    assert float(total.detach()) == pytest.approx(0, abs=1e-6)


def test_lpips_term_is_positive_and_differentiable():
    real, _ = _images()
    fake, fake_raw = _images(seed=2)
    G = StubG(fake, fake_raw)
    total, terms, _ = PersonalizationLoss(torch.device('cpu'), 'alex-random')(G, real, torch.zeros(2, 25),
                                                                              torch.zeros(2, 3, 4), 8)
    assert terms['lpips'] > 0 and terms['lpips_raw'] > 0  # 8 px raw images are upsampled for AlexNet
    total.backward()
    assert G.scale.grad is not None and torch.isfinite(G.scale.grad)


def test_density_regularisation_is_eg3d_l1_with_lazy_gain():
    real, _ = _images()
    fake, fake_raw = _images(seed=1)
    G = StubG(fake, fake_raw, density_reg=0.25, p_dist=0.004)
    loss_fn = PersonalizationLoss(torch.device('cpu'), 'none')
    with torch.no_grad():
        torch.manual_seed(0)
        plain, terms0, _ = loss_fn(G, real, torch.zeros(2, 25), torch.zeros(2, 3, 4), 8, regularize=False)
        assert 'density' not in terms0
        torch.manual_seed(0)
        total, terms, _ = loss_fn(G, real, torch.zeros(2, 25), torch.zeros(2, 3, 4), 8, regularize=True, reg_gain=4)
    # sigma(x) - sigma(x + d) = -(d1 + d2 + d3) with d ~ N(0, p^2): E|.| = sqrt(3) p sqrt(2 / pi).
    expected = 0.25 * math.sqrt(3) * 0.004 * math.sqrt(2 / math.pi)
    assert float(terms['density']) == pytest.approx(expected, rel=0.1)
    assert float(total) == pytest.approx(float(plain) + 4 * float(terms['density']), rel=1e-5)
    # Explicit settings (train.py's --density_reg / --density_reg_p_dist) replace the generator's.
    with torch.no_grad():
        off = PersonalizationLoss(torch.device('cpu'), 'none', density_reg=0.0)
        assert not off.has_lazy_terms(G) and 'density' not in off(G, real, torch.zeros(2, 25), torch.zeros(2, 3, 4), 8,
                                                                   regularize=True)[1]
        torch.manual_seed(0)
        strong = PersonalizationLoss(torch.device('cpu'), 'none', density_reg=0.5, density_reg_p_dist=0.008)
        terms2 = strong(G, real, torch.zeros(2, 25), torch.zeros(2, 3, 4), 8, regularize=True)[1]
    assert float(terms2['density']) == pytest.approx(4 * float(terms['density']), rel=1e-5)


def test_missing_lpips_backbone_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError('offline')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    for net, fname in [('alex', 'alexnet-owt-7be5be79.pth'), ('vgg', 'vgg16-397923af.pth')]:
        with pytest.raises(LPIPSUnavailable) as info:
            make_lpips(net, torch.device('cpu'))
        msg = str(info.value)
        assert str(tmp_path / 'hub' / 'checkpoints' / fname) in msg and '--lpips=none' in msg


def test_lpips_none_and_unknown():
    assert make_lpips('none', torch.device('cpu')) is None
    with pytest.raises(ValueError, match='--lpips must be one of'):
        make_lpips('squeeze', torch.device('cpu'))

# --- identity (ArcFace IR-SE50) ------------------------------------------------------------------


@pytest.fixture(scope='module')
def arcface():
    torch.manual_seed(0)
    return IRSE50().eval().requires_grad_(False)


def test_identity_loss_is_zero_for_same_image_and_differentiable(arcface):
    x, _ = _images(n=1, res=64, seed=3)
    y = torch.cat([x, torch.flip(x, [2])]).requires_grad_(True)
    loss = identity_loss(arcface, x.repeat(2, 1, 1, 1), y)
    assert loss.shape == (2,) and abs(float(loss[0].detach())) < 1e-5 and float(loss[1].detach()) > 0
    loss.sum().backward()
    assert y.grad.abs().sum() > 0


def test_arcface_loads_standard_state_dict_and_rejects_others(arcface, tmp_path):
    path = tmp_path / 'model_ir_se50.pth'
    torch.save(arcface.state_dict(), path)
    net = IRSE50.load(str(path))
    x = torch.rand(1, 3, 112, 112) * 2 - 1
    assert torch.equal(net(x), arcface(x)) and not any(p.requires_grad for p in net.parameters())
    assert 'body.23.res_layer.5.fc2.weight' in arcface.state_dict() and len(arcface.state_dict()) == 397
    bad = tmp_path / 'other.pth'
    torch.save({'fc.weight': torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match='other.pth.*not an IR-SE50'):
        IRSE50.load(str(bad))
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        IRSE50.load(str(tmp_path / 'missing.pth'))


def test_symmetric_cameras_are_mirror_images():
    G = StubG(*_images())
    torch.manual_seed(1)
    c1, c2 = mirrored_cameras(G, 3, torch.device('cpu'))
    for a, b in zip(c1, c2):
        assert np.allclose(mirror_camera(a.numpy()), b.numpy(), atol=1e-5)


def test_identity_terms_in_the_loss(arcface):
    real, _ = _images(n=1, res=32)
    fake, fake_raw = _images(n=1, res=32, seed=5)
    G = StubG(fake, fake_raw, density_reg=0)
    loss_fn = PersonalizationLoss(torch.device('cpu'), 'none', arcface=arcface, id_weight=0.5, sym_weight=2.0)
    with torch.no_grad():
        total, terms, _ = loss_fn(G, real, torch.zeros(1, 25), torch.zeros(1, 3, 4), 8, regularize=True, reg_gain=4)
    assert set(terms) == {'mse', 'mse_raw', 'id', 'sym_id'}
    expected = terms['mse'] + terms['mse_raw'] + 0.5 * terms['id'] + 4 * 2.0 * terms['sym_id']
    assert float(total) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match='--id_model'):
        PersonalizationLoss(torch.device('cpu'), 'none', arcface=None, id_weight=1.0)
