"""TriPlaneGenerator against the official golden outputs (tests/data/golden/tiny128.pt), plus a
full-size FFHQ-512 construction and render."""
import copy
import math

import pytest
import torch

from camera_utils import FOV_to_intrinsics, LookAtPoseSampler
from training import configs
from training.triplane import OSGDecoder, TriPlaneGenerator
from training.volumetric_rendering.ray_marcher import MipRayMarcher2
from training.volumetric_rendering.ray_sampler import RaySampler
from training.volumetric_rendering.renderer import ImportanceRenderer

ATOL = 1e-4
GRAD_RTOL = 1e-4


def assert_close_abs(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.detach() - expected).abs().max().item()
    assert err <= atol, f'max abs error {err:.3g} > {atol}'


def assert_close_scaled(actual, expected, rtol=GRAD_RTOL):
    """max|actual - expected| <= rtol * max|expected|, per tensor.

    Gradients mix large and near-zero entries, so an element-wise relative test would fail on
    entries that are zero up to float32 summation noise, and an absolute test would mean nothing
    for tensors of very different scales. Measuring the error against the tensor's own largest
    reference magnitude tests every entry at the precision the tensor is computed with.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item()
    err = (actual.detach() - expected).abs().max().item()
    assert scale > 0
    assert err <= rtol * scale, f'max abs error {err:.3g} > {rtol} * max|ref| ({scale:.3g})'


@pytest.fixture(scope='module')
def golden(golden_dir):
    return torch.load(golden_dir / 'tiny128.pt', weights_only=True)


@pytest.fixture(scope='module')
def G(golden):
    G = TriPlaneGenerator(**copy.deepcopy(golden['init_kwargs']))
    G.load_state_dict(golden['state_dict'], strict=True)
    return G.eval().requires_grad_(False)


@pytest.fixture(scope='module')
def synthesis_run(G, golden):
    """One seeded synthesis with gradients; records intermediates and the RNG state after it."""
    inputs = golden['inputs']
    captured = {}
    hooks = [
        G.backbone.synthesis.register_forward_hook(lambda m, args, out: captured.__setitem__('planes', out.detach())),
        G.superresolution.register_forward_hook(lambda m, args, out: captured.__setitem__('feature_image', args[1].detach())),
    ]
    params = dict(G.named_parameters())
    grad_names = list(golden['grads']['params'])
    for name in grad_names:
        params[name].requires_grad_(True)
    try:
        # As in the golden run, ws comes from the mapping network, so dL/dparam reaches the
        # mapping weights through ws; dL/dws is the gradient at the mapping output.
        ws = G.mapping(inputs['z'], inputs['c'], truncation_psi=1)
        assert ws.requires_grad
        torch.manual_seed(inputs['synthesis_seed'])
        out = G.synthesis(ws, inputs['c'], neural_rendering_resolution=inputs['neural_rendering_resolution'],
                          noise_mode=inputs['noise_mode'])
        rng_state_after = torch.get_rng_state()
        loss = (out['image'] * inputs['R1']).sum() + (out['image_raw'] * inputs['R2']).sum()
        grads = torch.autograd.grad(loss, [ws] + [params[n] for n in grad_names])
    finally:
        for h in hooks:
            h.remove()
        G.requires_grad_(False)
    return {
        'out': {k: v.detach() for k, v in out.items()},
        'captured': captured,
        'rng_state_after': rng_state_after,
        'loss': loss.item(),
        'grad_ws': grads[0],
        'grad_params': dict(zip(grad_names, grads[1:])),
    }


def test_object_tree_matches_official(G):
    assert isinstance(G.renderer, ImportanceRenderer)
    assert isinstance(G.renderer.ray_marcher, MipRayMarcher2)
    assert isinstance(G.ray_sampler, RaySampler)
    assert isinstance(G.decoder, OSGDecoder)
    assert G.decoder.hidden_dim == 64
    assert [type(m).__name__ for m in G.decoder.net] == ['FullyConnectedLayer', 'Softplus', 'FullyConnectedLayer']
    assert type(G.backbone).__name__ == 'Generator'
    assert type(G.superresolution).__name__ == 'SuperresolutionHybrid2X'
    assert G._last_planes is None
    # plane_axes is a plain attribute: not in the state_dict.
    assert not any('plane_axes' in k for k in G.state_dict())


def test_parameter_counts(G, golden):
    assert sum(p.numel() for p in G.parameters()) == golden['num_params']
    for name, n in golden['num_params_by_submodule'].items():
        assert sum(p.numel() for p in getattr(G, name).parameters()) == n, name
    assert sum(b.numel() for b in G.buffers()) == golden['num_buffer_elements']


def test_mapping(G, golden):
    inputs, outputs = golden['inputs'], golden['outputs']
    with torch.no_grad():
        ws = G.mapping(inputs['z'], inputs['c'], truncation_psi=1)
        ws_trunc = G.mapping(inputs['z'], inputs['c'], truncation_psi=inputs['truncation_psi'],
                             truncation_cutoff=inputs['truncation_cutoff'])
    assert_close_abs(ws, outputs['ws'])
    assert_close_abs(ws_trunc, outputs['ws_trunc'])


def test_mapping_ignores_camera_when_conditioning_is_zero(G, golden):
    assert G.rendering_kwargs['c_gen_conditioning_zero']
    z = golden['inputs']['z']
    with torch.no_grad():
        a = G.mapping(z, golden['inputs']['c'])
        b = G.mapping(z, torch.randn_like(golden['inputs']['c']))
    assert torch.equal(a, b)


@pytest.mark.parametrize('key', ['image', 'image_raw', 'image_depth'])
def test_synthesis_outputs(synthesis_run, golden, key):
    assert_close_abs(synthesis_run['out'][key], golden['outputs'][key])


def test_synthesis_returns_official_keys(synthesis_run, G, golden):
    assert set(synthesis_run['out']) == {'image', 'image_raw', 'image_depth'}
    assert G.neural_rendering_resolution == golden['inputs']['neural_rendering_resolution']


def test_synthesis_global_rng_draws(synthesis_run, golden):
    """Synthesis consumes exactly the documented draws: replaying them gives the same generator
    state, and on CPU the replayed values equal the recorded ones bit for bit."""
    calls = golden['random_calls']
    assert [c['fn'] for c in calls] == ['torch.rand_like', 'torch.rand']
    torch.manual_seed(golden['inputs']['synthesis_seed'])
    jitter = torch.rand(calls[0]['shape'])
    importance_u = torch.rand(calls[1]['shape'])
    assert torch.equal(torch.get_rng_state(), synthesis_run['rng_state_after'])
    assert torch.equal(jitter, golden['random_draws']['stratified_jitter'])
    assert torch.equal(importance_u, golden['random_draws']['importance_u'])


def test_intermediates(synthesis_run, golden):
    planes = synthesis_run['captured']['planes']
    inter = golden['intermediates']
    assert list(planes.shape) == inter['planes_shape']
    assert_close_abs(planes[:, :, ::16, ::16], inter['planes_strided16'])
    assert_close_abs(planes.mean(dim=(2, 3)), inter['planes_channel_mean'])
    feature_image = synthesis_run['captured']['feature_image']
    assert_close_abs(feature_image, inter['feature_image'])
    assert torch.equal(feature_image[:, :3], synthesis_run['out']['image_raw'])


def test_loss_and_gradients(synthesis_run, golden):
    # L sums ~10^5 products with the random cotangents, so output errors of ~1e-6 add up to
    # ~1e-4 absolute; relative to |L| (about 3.9) this stays within 1e-4.
    assert synthesis_run['loss'] == pytest.approx(golden['outputs']['loss'], rel=1e-4)
    assert_close_scaled(synthesis_run['grad_ws'], golden['grads']['ws'])
    for name, ref in golden['grads']['params'].items():
        assert_close_scaled(synthesis_run['grad_params'][name], ref)


def test_sample_mixed(G, golden):
    inputs, outputs = golden['inputs'], golden['outputs']
    with torch.no_grad():
        out = G.sample_mixed(inputs['sample_coordinates'], inputs['sample_directions'], outputs['ws'], noise_mode='const')
    assert_close_abs(out['sigma'], outputs['sigma'])
    assert_close_abs(out['rgb'], outputs['rgb'])


def test_cached_backbone_reuses_planes(G, golden):
    inputs, outputs = golden['inputs'], golden['outputs']
    ws, c = outputs['ws'][:1], inputs['c'][:1]
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            first = G.synthesis(ws, c, neural_rendering_resolution=8, noise_mode='const', cache_backbone=True)
            assert G._last_planes is not None
            torch.manual_seed(0)
            # Different ws, but the cached planes are used: identical raw image.
            second = G.synthesis(torch.zeros_like(ws), c, neural_rendering_resolution=8, noise_mode='const', use_cached_backbone=True)
    finally:
        G._last_planes = None
        G.neural_rendering_resolution = inputs['neural_rendering_resolution']
    assert torch.equal(first['image_raw'], second['image_raw'])


def test_ffhq512_full_size_render():
    """The official FFHQ-512 generator (train.py defaults) builds and renders one image on CPU."""
    kwargs = configs.generator_kwargs('ffhq', resolution=512)
    assert kwargs['rendering_kwargs']['superresolution_module'] == 'training.superresolution.SuperresolutionHybrid8XDC'
    torch.manual_seed(0)
    G = TriPlaneGenerator(**kwargs).eval().requires_grad_(False)
    z = torch.randn(1, G.z_dim)
    cam2world = LookAtPoseSampler.sample(math.pi / 2, math.pi / 2, torch.tensor([0, 0, 0.2]), radius=2.7)
    c = torch.cat([cam2world.reshape(1, 16), FOV_to_intrinsics(18.837).reshape(1, 9)], dim=1)
    with torch.no_grad():
        out = G(z, c, neural_rendering_resolution=64, noise_mode='const')
    assert out['image'].shape == (1, 3, 512, 512)
    assert out['image_raw'].shape == (1, 3, 64, 64)
    assert out['image_depth'].shape == (1, 1, 64, 64)
    for value in out.values():
        assert torch.isfinite(value).all()
    rk = kwargs['rendering_kwargs']
    assert out['image_depth'].min() >= rk['ray_start'] and out['image_depth'].max() <= rk['ray_end'] + 1


def test_configs_reproduce_golden_kwargs_layout(golden):
    """The golden tiny model was built like train.py's ffhq config at 128 px with a smaller network
    and fewer depth samples; everything else must coincide, key order included."""
    ref = golden['init_kwargs']
    kwargs = configs.generator_kwargs('ffhq', resolution=128, cbase=2048, cmax=32, sr_num_fp16_res=0)
    kwargs['z_dim'] = ref['z_dim']
    kwargs['rendering_kwargs'].update(depth_resolution=12, depth_resolution_importance=12)
    assert list(kwargs) == list(ref)
    assert list(kwargs['rendering_kwargs']) == list(ref['rendering_kwargs'])
    assert kwargs == ref


def test_dataset_configs():
    afhq = configs.rendering_options('afhq', 512)
    shapenet = configs.rendering_options('shapenet', 128)
    assert afhq['avg_camera_pivot'] == [0, 0, -0.06] and afhq['depth_resolution'] == 48
    assert shapenet['white_back'] is True and shapenet['box_warp'] == 1.6 and shapenet['ray_start'] == 0.1
    assert shapenet['superresolution_module'] == 'training.superresolution.SuperresolutionHybrid2X'
    posed = configs.rendering_options('ffhq', gen_pose_cond=True)
    assert posed['c_gen_conditioning_zero'] is False and posed['gpc_reg_prob'] == 0.5
    assert configs.rendering_options('ffhq')['gpc_reg_prob'] is None
    with pytest.raises(ValueError):
        configs.rendering_options('celeba')
    with pytest.raises(ValueError):
        configs.generator_kwargs('ffhq', resolution=1024)
    D_kwargs = configs.discriminator_kwargs(512)
    assert D_kwargs['num_fp16_res'] == 4 and D_kwargs['conv_clamp'] == 256
    assert D_kwargs['epilogue_kwargs'] == {'mbstd_group_size': 4}
