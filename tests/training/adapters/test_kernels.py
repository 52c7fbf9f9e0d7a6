"""The fast kernels (training/adapters/kernels.py) against the reference path of layers.py: which path runs,
the same values and gradients, and snapshots that run in official EG3D code, where the kernels do not exist."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import legacy
from adapter_testlib import FAMILIES, injected, layer_inputs, randomize_adapters
from training import adapters
from training.adapters import AdapterConfig, kernels, layers

KERNEL_ENTRY_POINTS = ['modulate', 'demodulation_coefficients', 'stride_one_adapted_conv', 'low_rank_branch',
                       'demodulate_bias_act']


def training_step(name: str, H: torch.nn.Module, dtype: torch.dtype):
    """A non-fused (training) forward of one test layer and the gradients of its input, styles input and
    adapter tensors (the layer's and its style affine's) for a fixed probe."""
    layer = H.synthesis[name]
    args, kwargs = layer_inputs(name, layer)
    args = tuple(a.to(dtype).requires_grad_(True) for a in args)
    if name.startswith('syn') or name == 'torgb':
        kwargs['fused_modconv'] = False
    out = layer(*args, **kwargs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    leaves = list(args) + adapters.trainable_parameters(layer)
    return out, torch.autograd.grad((out * probe).sum(), leaves)


def adapted_layers(selection: str, dtype: torch.dtype) -> torch.nn.Module:
    H = injected(AdapterConfig(r=2, extras='my3dgen', targets=('synthesis',)), K=2)
    randomize_adapters(H, std=0.3)
    for p in H.parameters():
        p.data = p.data.to(dtype)
    H.train()
    adapters.select(H, 1 if selection == 'int' else torch.tensor([1, 0, 0]))  # not symmetric: a swap shows
    return H


def test_fast_kernels_run_by_default_and_none_on_the_reference_path(monkeypatch):
    calls = {entry: 0 for entry in KERNEL_ENTRY_POINTS}

    def counted(entry):
        real = getattr(kernels, entry)

        def call(*args, **kwargs):
            calls[entry] += 1
            return real(*args, **kwargs)
        return call

    for entry in KERNEL_ENTRY_POINTS:
        monkeypatch.setattr(kernels, entry, counted(entry))
    monkeypatch.setenv('EG3D_ADAPTER_CONV_PATH', 'branch')
    assert layers.fast_kernels() is kernels
    H = adapted_layers('int', torch.float32)
    monkeypatch.setenv('EG3D_ADAPTER_KERNELS', 'reference')
    for name in FAMILIES:
        training_step(name, H, torch.float32)
    assert not any(calls.values()), calls
    monkeypatch.delenv('EG3D_ADAPTER_KERNELS')  # the default: fast
    for name in FAMILIES:
        training_step(name, H, torch.float32)
    assert all(calls.values()), calls


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=['float64', 'float32'])
@pytest.mark.parametrize('selection', ['int', 'per-sample'])
def test_reference_and_fast_paths_give_the_same_values_and_gradients(monkeypatch, conv_path, selection, dtype, tol):
    """Every layer family, on the merged-weight and the branch path: the output and the gradients of the input,
    the styles input and every adapter tensor (factors, bias, noise strength and constant deltas, affine
    factors) agree to rounding."""
    H = adapted_layers(selection, dtype)
    for name in FAMILIES:
        results = {}
        for choice in ('reference', 'fast'):
            monkeypatch.setenv('EG3D_ADAPTER_KERNELS', choice)
            results[choice] = training_step(name, H, dtype)
        (want, want_grads), (got, got_grads) = results['reference'], results['fast']
        scale = float(want.detach().abs().max())
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=name)
        assert len(got_grads) == len(want_grads) >= 3
        for i, (g, w) in enumerate(zip(got_grads, want_grads)):
            assert w.abs().sum() > 0, f'{name}: zero gradient {i}'
            torch.testing.assert_close(g, w, rtol=tol, atol=tol * float(w.abs().max()), msg=f'{name}: gradient {i}')


def test_unknown_kernels_choice_is_an_error(monkeypatch):
    monkeypatch.setenv('EG3D_ADAPTER_KERNELS', 'cuda')
    H = adapted_layers('int', torch.float32)
    with pytest.raises(ValueError, match="EG3D_ADAPTER_KERNELS='cuda': use fast or reference"):
        training_step('syn', H, torch.float32)


def test_an_absent_kernels_module_means_the_reference_path(monkeypatch):
    H = adapted_layers('per-sample', torch.float32)
    monkeypatch.setenv('EG3D_ADAPTER_KERNELS', 'reference')
    want = [training_step(name, H, torch.float32) for name in FAMILIES]
    monkeypatch.setattr(layers, 'KERNELS_MODULE', 'training.adapters.no_such_kernels')
    monkeypatch.setattr(layers, '_kernels_module', None)
    monkeypatch.setenv('EG3D_ADAPTER_KERNELS', 'fast')
    assert layers.fast_kernels() is None
    for name, (out, grads) in zip(FAMILIES, want):
        got, got_grads = training_step(name, H, torch.float32)
        assert torch.equal(got, out) and all(torch.equal(a, b) for a, b in zip(got_grads, grads)), name


def test_a_kernels_module_that_fails_to_import_is_an_error(monkeypatch, tmp_path):
    """Only the absence of the kernels module selects the reference path; a dependency it lacks is reported."""
    (tmp_path / 'broken_kernels.py').write_text('import no_such_dependency_of_the_kernels\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(layers, 'KERNELS_MODULE', 'broken_kernels')
    monkeypatch.setattr(layers, '_kernels_module', None)
    with pytest.raises(ModuleNotFoundError, match='no_such_dependency_of_the_kernels'):
        layers.fast_kernels()


# --- official EG3D code: our snapshot without the kernels module ---------------------------------------------

OFFICIAL_RUN = r'''
import os, pickle, sys
tree, snapshot, inputs, out_path = sys.argv[1:]
# Only the official-like tree: no folder that holds this project's training package (the editable install).
sys.path[:] = [tree] + [p for p in sys.path if not os.path.isdir(os.path.join(p or '.', 'training'))]
import torch
with open(snapshot, 'rb') as f:
    G = pickle.load(f)['G_ema']
layer = G.backbone.synthesis.b4.conv1
layers_module = sys.modules[type(layer).__module__]
assert layers_module.__name__.startswith('_imported_module_'), layers_module.__name__
assert layers_module.fast_kernels() is None
ws, c = torch.load(inputs).values()
renders = {}
for fused in (True, False):
    torch.manual_seed(3)
    with torch.no_grad():
        renders[fused] = G.eval().synthesis(ws, c, neural_rendering_resolution=32, noise_mode='const',
                                            fused_modconv=fused)['image']
for name, p in G.named_parameters():
    p.requires_grad_(name.rsplit('.', 1)[-1].startswith('lora_'))
torch.manual_seed(3)
G.train().synthesis(ws, c, neural_rendering_resolution=32, noise_mode='const')['image'].square().mean().backward()
grads = {name: p.grad for name, p in G.named_parameters() if p.requires_grad}
assert 'training.adapters' not in sys.modules, 'the official tree must not have our adapters package'
torch.save(dict(renders=renders, grads=grads), out_path)
'''


def official_like_tree(root: Path) -> Path:
    """eg3d/ as official EG3D code has it: everything but training/adapters/ (symbolic links)."""
    eg3d = Path(layers.__file__).resolve().parents[2]
    (root / 'training').mkdir(parents=True)
    for entry in eg3d.iterdir():
        if entry.name != 'training':
            (root / entry.name).symlink_to(entry)
    for entry in (eg3d / 'training').iterdir():
        if entry.name != 'adapters':
            (root / 'training' / entry.name).symlink_to(entry)
    return root


def ours(G: torch.nn.Module, ws: torch.Tensor, c: torch.Tensor, monkeypatch, choice: str) -> dict:
    """The official script's renders and gradients, computed in this process with EG3D_ADAPTER_KERNELS=choice."""
    monkeypatch.setenv('EG3D_ADAPTER_KERNELS', choice)
    G = copy.deepcopy(G)
    renders = {}
    for fused in (True, False):
        torch.manual_seed(3)
        with torch.no_grad():
            renders[fused] = G.eval().synthesis(ws, c, neural_rendering_resolution=32, noise_mode='const',
                                                fused_modconv=fused)['image']
    for name, p in G.named_parameters():
        p.requires_grad_(name.rsplit('.', 1)[-1].startswith('lora_'))
    torch.manual_seed(3)
    G.train().synthesis(ws, c, neural_rendering_resolution=32, noise_mode='const')['image'].square().mean().backward()
    return dict(renders=renders, grads={name: p.grad for name, p in G.named_parameters() if p.requires_grad})


def test_snapshot_renders_and_trains_in_official_code_without_the_kernels(tmp_path, tiny_golden, tiny_base,
                                                                           monkeypatch):
    """Official EG3D code runs the layers.py embedded in our snapshot, without kernels.py: the reference path.
    Inference (fused) gives our bits; non-fused renders and adapter gradients are those of our reference path
    and, to rounding, of our fast path. The kernels' source is not in the snapshot."""
    monkeypatch.setenv('EG3D_ADAPTER_CONV_PATH', 'branch')  # the low-rank branch, as at FFHQ 512
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, AdapterConfig(r=1, extras='my3dgen'))
    randomize_adapters(G, std=0.05)
    snapshot = tmp_path / 'network-snapshot.pkl'
    legacy.save_network_pkl({'G': G, 'G_ema': G, 'D': None}, snapshot)
    data = snapshot.read_bytes()
    assert b'def fast_kernels' in data and b'class _StrideOneAdaptedConv' not in data
    ws, c = tiny_golden['outputs']['ws'][:1], tiny_golden['inputs']['c'][:1]
    torch.save({'ws': ws, 'c': c}, tmp_path / 'inputs.pt')
    tree = official_like_tree(tmp_path / 'official')
    result = subprocess.run([sys.executable, '-c', OFFICIAL_RUN, str(tree), str(snapshot), str(tmp_path / 'inputs.pt'),
                             str(tmp_path / 'official.pt')], cwd=tree, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH='', EG3D_ADAPTER_CONV_PATH='branch'), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    official = torch.load(tmp_path / 'official.pt')
    reference, fast = (ours(G, ws, c, monkeypatch, choice) for choice in ('reference', 'fast'))
    assert torch.equal(official['renders'][True], fast['renders'][True])
    torch.testing.assert_close(official['renders'][False], reference['renders'][False], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(official['renders'][False], fast['renders'][False], rtol=1e-5, atol=1e-5)
    assert official['grads'].keys() == fast['grads'].keys() and len(fast['grads']) > 10
    for name, g in official['grads'].items():
        assert g.abs().sum() > 0 or fast['grads'][name].abs().sum() == 0, name
        scale = float(fast['grads'][name].abs().max())
        torch.testing.assert_close(g, reference['grads'][name], rtol=1e-6, atol=1e-6 * scale, msg=name)
        torch.testing.assert_close(g, fast['grads'][name], rtol=1e-4, atol=1e-4 * scale, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA dispatch of the kernels: needs a GPU')
def test_reference_and_fast_paths_agree_on_cuda(monkeypatch, conv_path):
    """On CUDA the epilogue runs through bias_act's CUDA kernel: same values and gradients as the reference."""
    H = adapted_layers('per-sample', torch.float32).cuda()
    for name in FAMILIES:
        results = {}
        for choice in ('reference', 'fast'):
            monkeypatch.setenv('EG3D_ADAPTER_KERNELS', choice)
            layer = H.synthesis[name]
            args, kwargs = layer_inputs(name, layer)
            args = tuple(a.cuda().requires_grad_(True) for a in args)
            if name.startswith('syn') or name == 'torgb':
                kwargs['fused_modconv'] = False
            out = layer(*args, **kwargs)
            leaves = list(args) + adapters.trainable_parameters(layer)
            results[choice] = (out, torch.autograd.grad(out.square().sum(), leaves))
        (want, want_grads), (got, got_grads) = results['reference'], results['fast']
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3 * float(w.abs().max()), msg=name)
