"""The golden generator and discriminator (tests/data/golden, made by the official code on CPU) on each
device in float32: outputs within 1e-4, gradients within 1e-4 of each tensor's largest magnitude.

On CUDA this runs the compiled kernels, cuDNN and the CUDA branches of the layers against the CPU
golden data (TF32 off, as in training_loop). The renderer's random draws are replayed from the
golden file, since CUDA's generator draws other numbers than the CPU's. On CPU the same code checks
that the replay reproduces the golden run.
"""
import copy

import pytest
import torch

from training import dual_discriminator as dd
from training.triplane import TriPlaneGenerator

ATOL = 1e-4
RTOL = 1e-4
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason='needs a CUDA device'))]


def assert_close_scaled(actual, expected, rtol, name):
    """max |actual - expected| <= rtol * max |expected| (float rounding scales with the tensor, not each entry)."""
    actual = actual.detach().cpu()
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert scale > 0 and err <= rtol * scale, f'{name}: max abs error {err:.3g} > {rtol} * max|ref| ({scale:.3g})'


def assert_close_abs(actual, expected, atol, name):
    actual = actual.detach().cpu()
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    err = (actual - expected).abs().max().item()
    assert err <= atol, f'{name}: max abs error {err:.3g} > {atol}'


@pytest.fixture
def float32_precision():
    """Full float32 in cuDNN convolutions and matmuls (cuDNN allows TF32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def replay_random_draws(monkeypatch, golden, device):
    """torch.rand_like / torch.rand return the golden run's draws, in its order; returns the queue (empty when all were used)."""
    queue = [(call['fn'], golden['random_draws'][key])
             for call, key in zip(golden['random_calls'], ['stratified_jitter', 'importance_u'])]

    def take(fn, shape):
        assert queue, f'{fn}{tuple(shape)}: more random draws than the golden run made'
        expected_fn, value = queue.pop(0)
        assert (fn, list(shape)) == (expected_fn, list(value.shape)), f'{fn}{tuple(shape)}: expected {expected_fn}{tuple(value.shape)}'
        return value.to(device)

    def rand_like(t, **kwargs):
        return take('torch.rand_like', t.shape).to(t.dtype)

    def rand(*size, **kwargs):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        return take('torch.rand', shape)

    monkeypatch.setattr(torch, 'rand_like', rand_like)
    monkeypatch.setattr(torch, 'rand', rand)
    return queue


@pytest.fixture(scope='module')
def golden_g(golden_dir):
    return torch.load(golden_dir / 'tiny128.pt', weights_only=True)


@pytest.fixture(scope='module')
def golden_d(golden_dir):
    return torch.load(golden_dir / 'tiny128_D.pt', weights_only=False)


@pytest.mark.parametrize('device', DEVICES)
def test_generator_matches_golden(golden_g, device, monkeypatch, float32_precision):
    golden = golden_g
    G = TriPlaneGenerator(**copy.deepcopy(golden['init_kwargs']))
    G.load_state_dict(golden['state_dict'], strict=True)
    G = G.eval().requires_grad_(False).to(device)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in golden['inputs'].items()}
    params = dict(G.named_parameters())
    grad_names = list(golden['grads']['params'])
    for name in grad_names:
        params[name].requires_grad_(True)

    queue = replay_random_draws(monkeypatch, golden, device)
    ws = G.mapping(inputs['z'], inputs['c'], truncation_psi=1)
    out = G.synthesis(ws, inputs['c'], neural_rendering_resolution=inputs['neural_rendering_resolution'],
                      noise_mode=inputs['noise_mode'])
    monkeypatch.undo()
    assert not queue, 'the renderer made fewer random draws than the golden run'
    loss = (out['image'] * inputs['R1']).sum() + (out['image_raw'] * inputs['R2']).sum()
    grads = torch.autograd.grad(loss, [ws] + [params[n] for n in grad_names])

    assert out['image'].device.type == device
    for key in ('image', 'image_raw', 'image_depth'):
        assert_close_abs(out[key], golden['outputs'][key], ATOL, key)
    assert loss.item() == pytest.approx(golden['outputs']['loss'], rel=RTOL)
    assert_close_scaled(grads[0], golden['grads']['ws'], RTOL, 'ws')
    for name, grad in zip(grad_names, grads[1:]):
        assert_close_scaled(grad, golden['grads']['params'][name], RTOL, name)


@pytest.mark.parametrize('device', DEVICES)
def test_discriminator_matches_golden(golden_d, device, float32_precision):
    golden = golden_d
    D = dd.DualDiscriminator(**golden['init_kwargs'])
    D.load_state_dict(golden['state_dict'], strict=True)
    D = D.eval().to(device)
    image = golden['inputs']['img']['image'].to(device).requires_grad_(True)
    image_raw = golden['inputs']['img']['image_raw'].to(device).requires_grad_(True)
    logits = D({'image': image, 'image_raw': image_raw}, golden['inputs']['c'].to(device))
    assert logits.device.type == device
    assert_close_abs(logits, golden['outputs']['logits'], ATOL, 'logits')

    params = dict(D.named_parameters())
    names = list(golden['grads']['params'])
    grads = torch.autograd.grad((logits * golden['cotangent'].to(device)).sum(),
                                [image, image_raw] + [params[n] for n in names])
    assert_close_scaled(grads[0], golden['grads']['image'], RTOL, 'image')
    assert_close_scaled(grads[1], golden['grads']['image_raw'], RTOL, 'image_raw')
    for name, grad in zip(names, grads[2:]):
        assert_close_scaled(grad, golden['grads']['params'][name], RTOL, name)
