"""gen_samples.py: multi-view grids of seeds / latents / interpolations, several adapters, shapes (.mrc, .ply)."""
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import gen_samples
import shape_utils
from training import adapters
from training import inference as inf
from training import synthetic_identity

FAST = ['--nrr=16', '--num-views=2', '--device=cpu']


def make_adapter(base_pkl, path, scale, config=None):
    """Adapter file on `base_pkl` with random B factors of std `scale` (0: renders exactly like the base)."""
    G = inf.load_generator(base_pkl)
    adapters.inject(G, config or adapters.AdapterConfig(r=1))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith('lora_B'):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    adapters.save(G, str(path))
    return path


def run(args):
    return CliRunner().invoke(gen_samples.main, [str(a) for a in args])


def read_png(path):
    return np.asarray(PIL.Image.open(path))


def test_seeds_latents_and_interpolation_grids(tiny_identity, tmp_path):
    a, b = tiny_identity / 'train' / 'image_0_latent.npy', tiny_identity / 'train' / 'image_1_latent.npy'
    result = run(['--network', tiny_identity / 'base.pkl', '--seeds=0-1', '--latents', a, '--interpolate', a, b,
                  '--steps=3', '--save-latents', '--outdir', tmp_path, *FAST])
    assert result.exit_code == 0, result.output
    G = inf.load_generator(tiny_identity / 'base.pkl')
    assert np.array_equal(np.load(tmp_path / 'seed0001_latent.npy'), inf.seed_latents(G, [1], 0.7).numpy())
    names = ['seed0000', 'seed0001', 'image_0'] + [f'interp_image_0_image_1_{i:03d}' for i in range(3)]
    for name in names:
        assert read_png(tmp_path / f'{name}.png').shape == (128, 256, 3)  # one row of 2 views
    assert read_png(tmp_path / 'grid.png').shape == (128 * len(names), 256, 3)
    # the interpolation starts at A: same render as A itself
    assert np.array_equal(read_png(tmp_path / 'image_0.png'), read_png(tmp_path / 'interp_image_0_image_1_000.png'))


def test_several_adapters_render_each_identity(tiny_identity, tmp_path):
    zero = make_adapter(tiny_identity / 'base.pkl', tmp_path / 'zero.safetensors', 0.0)
    other = make_adapter(tiny_identity / 'base.pkl', tmp_path / 'other.safetensors', 0.05)
    out = tmp_path / 'out'
    result = run(['--network', tiny_identity / 'base.pkl', '--adapter', zero, '--adapter', other, '--seeds=0',
                  '--outdir', out, *FAST])
    assert result.exit_code == 0, result.output
    plain = tmp_path / 'plain'
    assert run(['--network', tiny_identity / 'base.pkl', '--seeds=0', '--outdir', plain, *FAST]).exit_code == 0
    first, second = read_png(out / 'seed0000_adapter0.png'), read_png(out / 'seed0000_adapter1.png')
    assert np.array_equal(first, read_png(plain / 'seed0000.png'))  # zero adapter == base
    assert not np.array_equal(first, second)
    only = tmp_path / 'only'
    result = run(['--network', tiny_identity / 'base.pkl', '--adapter', zero, '--adapter', other, '--adapter-index=1',
                  '--seeds=0', '--outdir', only, *FAST])
    assert result.exit_code == 0 and sorted(p.name for p in only.glob('seed*')) == ['seed0000_adapter1.png']
    assert np.array_equal(read_png(only / 'seed0000_adapter1.png'), second)


def test_adapter_errors(tiny_identity, tmp_path):
    zero = make_adapter(tiny_identity / 'base.pkl', tmp_path / 'zero.safetensors', 0.0)
    rank2 = make_adapter(tiny_identity / 'base.pkl', tmp_path / 'rank2.safetensors', 0.0, adapters.AdapterConfig(r=2))
    result = run(['--network', tiny_identity / 'base.pkl', '--adapter', zero, '--adapter', rank2, '--seeds=0',
                  '--outdir', tmp_path / 'o', *FAST])
    assert result.exit_code == 1 and 'different configs' in result.output
    result = run(['--network', tiny_identity / 'base.pkl', '--adapter', zero, '--adapter-index=3', '--seeds=0',
                  '--outdir', tmp_path / 'o', *FAST])
    assert result.exit_code == 1 and 'carries 1 adapter' in result.output
    other = tmp_path / 'other_base.pkl'
    synthetic_identity.save_generator_pkl(synthetic_identity.build_tiny_generator(seed=7), str(other))
    result = run(['--network', other, '--adapter', zero, '--seeds=0', '--outdir', tmp_path / 'o', *FAST])
    assert result.exit_code == 1 and 'different base generator' in result.output
    assert not (tmp_path / 'o').exists()


def test_latent_errors(tiny_identity, tmp_path):
    np.save(tmp_path / 'w18_latent.npy', np.zeros((1, 18, 512), np.float32))
    result = run(['--network', tiny_identity / 'base.pkl', '--latents', tmp_path / 'w18_latent.npy',
                  '--outdir', tmp_path / 'o', *FAST])
    assert result.exit_code == 1 and 'shape [1, 18, 512]' in result.output
    result = run(['--network', tiny_identity / 'base.pkl', '--latents', tmp_path / 'missing.npy', '--outdir', tmp_path, *FAST])
    assert result.exit_code == 1 and 'Latent file not found' in result.output
    result = run(['--network', tiny_identity / 'base.pkl', '--outdir', tmp_path / 'o', *FAST])
    assert result.exit_code == 1 and 'nothing to render' in result.output


def read_ply(path):
    """(header lines, vertices [V, 3], faces [F, 3]) of a binary little-endian triangle PLY."""
    data = path.read_bytes()
    end = data.index(b'end_header\n') + len(b'end_header\n')
    header = data[:end].decode('ascii').splitlines()
    counts = {line.split()[1]: int(line.split()[2]) for line in header if line.startswith('element')}
    verts = np.frombuffer(data, dtype='<f4', count=3 * counts['vertex'], offset=end).reshape(-1, 3)
    faces = np.frombuffer(data, dtype=[('n', 'u1'), ('i', '<i4', (3,))], offset=end + verts.nbytes)
    assert len(faces) == counts['face'] and (faces['n'] == 3).all()
    return header, verts, faces['i']


def test_shapes_write_readable_mrc_and_ply(tiny_identity, tmp_path):
    import mrcfile
    G = inf.load_generator(tiny_identity / 'base.pkl')
    ws = inf.seed_latents(G, [0], 0.7)
    volume = shape_utils.extract_density(G, ws, 16, progress=False)
    level = float(np.median(volume))
    result = run(['--network', tiny_identity / 'base.pkl', '--seeds=0', '--outdir', tmp_path, '--shapes',
                  '--shape-res=16', f'--shape-level={level}', *FAST])
    assert result.exit_code == 0, result.output
    with mrcfile.open(tmp_path / 'seed0000.mrc') as mrc:
        assert mrc.data.shape == (16, 16, 16)
        assert np.allclose(mrc.data, volume, atol=1e-5)
    header, verts, faces = read_ply(tmp_path / 'seed0000.ply')
    assert header[:2] == ['ply', 'format binary_little_endian 1.0']
    assert len(verts) > 0 and len(faces) > 0 and faces.max() < len(verts)
    box = G.rendering_kwargs['box_warp']
    assert np.abs(verts).max() <= box / 2 + 1e-5  # world coordinates inside the tri-plane cube

    result = run(['--network', tiny_identity / 'base.pkl', '--seeds=0', '--outdir', tmp_path / 'nolevel', '--shapes',
                  '--shape-res=8', '--shape-level=1e6', *FAST])
    assert result.exit_code == 0 and 'no mesh written' in result.output
    assert (tmp_path / 'nolevel' / 'seed0000.mrc').is_file() and not (tmp_path / 'nolevel' / 'seed0000.ply').exists()


def test_density_to_mesh_closes_a_sphere():
    axis = np.linspace(-0.5, 0.5, 24)
    z, y, x = np.meshgrid(axis, axis, axis, indexing='ij')
    volume = 1.0 - np.sqrt(x ** 2 + y ** 2 + z ** 2) / 0.3  # > 0 inside a sphere of radius 0.3
    verts, faces = shape_utils.density_to_mesh(volume, level=0.0, box_size=1.0)
    radii = np.linalg.norm(verts, axis=1)
    assert np.allclose(radii, 0.3, atol=0.02)
    # outward winding: the signed volume of the closed mesh is positive
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    signed_volume = np.einsum('ij,ij->i', v0, np.cross(v1, v2)).sum() / 6
    assert signed_volume == pytest.approx(4 / 3 * np.pi * 0.3 ** 3, rel=0.1)


@pytest.mark.parametrize('cwd, script', [('.', 'eg3d/gen_samples.py'), ('eg3d', 'projector.py')])
def test_scripts_run_from_the_repo_root_and_from_eg3d(cwd, script):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, script, '--help'], cwd=root / cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '--network' in proc.stdout and '--adapter' in proc.stdout
