"""A snapshot written before the wrapper/kernel split of layers.py (tests/data/adapter_snapshot_9a06e15/README.md)
still loads, renders its pixels, takes its adapter file and resumes training with today's code."""
import os
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import legacy
import train
from training import adapters
from training.dataset import read_identity

OLD = Path(__file__).resolve().parents[2] / 'data' / 'adapter_snapshot_9a06e15'
SNAPSHOT = OLD / 'network-snapshot-000000.003.pkl'
# The command that wrote the snapshot (README.md); resuming it at step 3 runs step 4.
TRAIN_ARGS = ['--lora=1', '--lora_targets=mapping,synthesis,superresolution,decoder', '--lora_extras=my3dgen',
              '--batch=1', '--kimg=0.004', '--tick=0.001', '--snap=1', '--glr=0.01', '--density_reg=0', '--cfg=resume',
              '--device=cpu', '--lpips=none', '--neural_rendering_resolution_initial=32', '--progress=False']


def render(G: torch.nn.Module) -> dict:
    """What expected-render.pt holds: image_0's latent and camera, seed 7, neural rendering at 32 px."""
    _, _, cameras, latents = read_identity(str(OLD / 'identity'))
    torch.manual_seed(7)
    with torch.no_grad():
        return G.eval().synthesis(torch.from_numpy(latents[:1]), torch.from_numpy(cameras[:1]),
                                  neural_rendering_resolution=32, noise_mode='const')


def assert_stored_render(out: dict) -> None:
    """The stored pixels, up to the last bits a CPU of another kind may change (equal bits on the machine that
    wrote them)."""
    want = torch.load(OLD / 'expected-render.pt')
    assert out.keys() == want.keys()
    for key in want:
        assert (out[key] - want[key]).abs().max() <= 1e-5, key


@pytest.fixture(scope='module')
def old_G() -> torch.nn.Module:
    return legacy.load_network_pkl(str(SNAPSHOT))['G_ema']


def test_old_snapshot_loads_safely_into_todays_classes_and_renders_its_pixels(old_G):
    assert adapters.is_injected(old_G)
    cfg = adapters.get_config(old_G)
    assert (cfg.r, cfg.extras, cfg.adalora) == (1, 'my3dgen', False)
    assert tuple(cfg.targets) == ('mapping', 'synthesis', 'superresolution', 'decoder')
    assert type(old_G.backbone.synthesis.b4.conv1).__module__ == 'training.adapters.layers'
    assert_stored_render(render(old_G))


def test_old_snapshot_loads_official_style_and_renders_the_same_bits(old_G):
    """`pickle.load` runs the old layers.py embedded in the file (kernels included), as official EG3D code does."""
    with open(SNAPSHOT, 'rb') as f:
        G = pickle.load(f)['G_ema']
    layer_module = type(G.backbone.synthesis.b4.conv1).__module__
    assert layer_module.startswith('_imported_module_'), layer_module
    old, today = render(G), render(old_G)
    for key in old:
        assert torch.equal(today[key], old[key]), key


def test_old_adapter_file_loads_onto_the_snapshot_base(old_G):
    G = legacy.load_network_pkl(str(SNAPSHOT))['G_ema']
    with torch.no_grad():
        for p in adapters.trainable_parameters(G):
            p.zero_()
    adapters.load(G, str(OLD / 'adapter-000000.003.safetensors'))
    want = render(old_G)
    for key, value in render(G).items():
        assert torch.equal(value, want[key]), key


def test_training_resumes_from_the_old_snapshot_as_the_old_code_did(tmp_path):
    """One more step from the old snapshot and its training state gives the old code's step-4 adapter."""
    args = [f'--outdir={tmp_path}', f'--data={OLD / "identity"}', f'--resume={SNAPSHOT}'] + TRAIN_ARGS
    result = CliRunner().invoke(train.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = tmp_path / os.listdir(tmp_path)[0]
    assert 'Restored optimizer state' in (run / 'log.txt').read_text()
    got = load_file(str(run / 'adapter-000000.004.safetensors'))
    want = load_file(str(OLD / 'expected-resumed-adapter-000000.004.safetensors'))
    start = load_file(str(OLD / 'adapter-000000.003.safetensors'))
    assert got.keys() == want.keys()
    assert any(not torch.equal(want[k], start[k]) for k in want)  # the step changed the adapter
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
