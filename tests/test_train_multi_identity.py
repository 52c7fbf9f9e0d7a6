"""train.py on a folder of identities: one adapter each, trained in one run, equal to single-identity runs."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import legacy
import train
from training import adapters
from training import synthetic_identity as si
from training.dataset import read_identity

VIEWS, HELDOUT, STEPS, PER_IDENTITY_BATCH = 4, 2, 8, 4
# `adapter`, a step per batch: the comparison is of the multi-identity arithmetic, the default's one image per step
# and per-identity step search are tested in tests/training (test_images_per_step.py, test_step_search.py).
TINY = ['--cfg=resume', '--device=cpu', '--lpips=none', '--neural_rendering_resolution_initial=32', '--progress=False',
        '--lora=1', '--recipe=adapter', '--glr=0.005', '--betas=0.9,0.99', '--density_reg=0', '--grid=0', '--seed=5']


@pytest.fixture(scope='module')
def people(tmp_path_factory):
    """Two synthetic people on one tiny base: people/person_0, people/person_1, their held-out views, base.pkl."""
    return si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'synthetic-people-2'), count=2, views=VIEWS,
                              heldout=HELDOUT, strength=0.3)


def _train(outdir, data, resume, batch, extra=()):
    args = [f'--outdir={outdir}', f'--data={data}', f'--resume={resume}', f'--batch={batch}',
            f'--kimg={STEPS * batch / 1000}', f'--tick={STEPS * batch / 2000}', '--snap=1'] + TINY + list(extra)
    result = CliRunner().invoke(train.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return outdir / sorted(os.listdir(outdir))[-1]


def _heldout_loss(G, people, k):
    """MSE of person k's held-out views, each rendered with the renderer seed its target was made with."""
    _, images, cameras, latents = read_identity(os.path.join(people.heldout, people.names[k]))
    targets = torch.from_numpy(images).float() / 127.5 - 1
    losses = []
    with torch.no_grad():
        for i in range(len(images)):
            torch.manual_seed(10 * k + 4 + VIEWS + i)  # write_identities renders person k's view j with seed 10k + 4 + j
            out = G.eval().synthesis(torch.from_numpy(latents[i:i + 1]), torch.from_numpy(cameras[i:i + 1]),
                                     neural_rendering_resolution=32, noise_mode='const')
            losses.append(float((out['image'] - targets[i:i + 1]).square().mean()))
    return float(np.mean(losses))


@pytest.fixture(scope='module')
def multi(people, tmp_path_factory):
    """A two-identity run with snapshots after STEPS / 2 and STEPS steps."""
    return _train(tmp_path_factory.mktemp('multi'), people.people, people.base_pkl, batch=2 * PER_IDENTITY_BATCH)


def test_two_identities_in_one_run_match_two_single_runs(people, multi, tmp_path):
    assert multi.name == f'00000-resume-people-gpus1-batch{2 * PER_IDENTITY_BATCH}-lora1-ids2'
    tag = f'000000.{STEPS * 2 * PER_IDENTITY_BATCH:03d}'
    files = set(os.listdir(multi))
    assert f'network-snapshot-{tag}.pkl' in files and f'adapter-{tag}.safetensors' not in files
    half = f'000000.{STEPS * PER_IDENTITY_BATCH:03d}'  # the first of the two snapshots
    assert sorted(os.listdir(multi / 'adapters')) == sorted(f'{name}-{t}.safetensors' for name in people.names
                                                            for t in (half, tag))
    stats = [json.loads(line) for line in open(multi / 'stats.jsonl')]
    assert all(f'identity/{name}/loss' in s for s in stats for name in people.names)
    assert stats[-1]['step'] == STEPS

    base = legacy.load_network_pkl(people.base_pkl)['G']
    snapshot = legacy.load_network_pkl(str(multi / f'network-snapshot-{tag}.pkl'))
    assert snapshot['personalization']['identities'] == people.names
    for k, name in enumerate(people.names):
        single = _train(tmp_path / f'single-{k}', os.path.join(people.people, name), people.base_pkl,
                        batch=PER_IDENTITY_BATCH)
        single_G = legacy.load_network_pkl(str(single / f'network-snapshot-000000.{STEPS * PER_IDENTITY_BATCH:03d}.pkl'))['G']
        in_group = adapters.load(legacy.load_network_pkl(people.base_pkl)['G'], str(multi / 'adapters' / f'{name}-{tag}.safetensors'))
        before, alone, grouped = (_heldout_loss(G, people, k) for G in (base, single_G, in_group))
        print(f'{name}: held-out MSE base {before:.5f}, single run {alone:.5f}, two-identity run {grouped:.5f}')
        assert alone < 0.8 * before and grouped < 0.8 * before  # training learned the person
        assert abs(grouped - alone) <= 0.1 * alone

    # One batch mixing both identities renders each sample as that identity's adapter alone does.
    G = snapshot['G_ema'].eval()
    _, _, cameras, latents = read_identity(os.path.join(people.heldout, people.names[0]))
    ws, c = torch.from_numpy(latents[:2]), torch.from_numpy(cameras[:2])
    renders = []
    for idx in ([1, 0], 0, 1):
        adapters.select(G, torch.tensor(idx) if isinstance(idx, list) else idx)
        torch.manual_seed(3)
        with torch.no_grad():
            renders.append(G.synthesis(ws, c, neural_rendering_resolution=32, noise_mode='const')['image'])
    mixed, as_first, as_second = renders
    torch.testing.assert_close(mixed[0], as_second[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], as_first[1], atol=1e-5, rtol=0)
    assert (as_first - as_second).abs().max() > 1e-3


def test_multi_identity_needs_adapters(people, tmp_path):
    args = [f'--outdir={tmp_path}', f'--data={people.people}', f'--resume={people.base_pkl}', '--lora=0'] + \
        [a for a in TINY if not a.startswith('--lora')]
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code != 0 and 'holds 2 identities' in result.output and '--lora' in result.output
    assert os.listdir(tmp_path) == []


def test_bad_identity_is_reported_with_its_folder_before_training(people, tmp_path):
    import shutil
    data = tmp_path / 'people'
    shutil.copytree(people.people, data)
    os.remove(data / 'person_1' / 'image_2_latent.npy')
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', f'--data={data}',
                                             f'--resume={people.base_pkl}'] + TINY)
    assert result.exit_code != 0 and 'person_1/image_2.png' in result.output and 'no latent' in result.output
    assert not (tmp_path / 'runs').exists()


def test_resumed_multi_identity_run_equals_uninterrupted_run(people, multi, tmp_path):
    half, tag = (f'000000.{STEPS * PER_IDENTITY_BATCH * f:03d}' for f in (1, 2))
    resumed = _train(tmp_path / 'resumed', people.people, str(multi / f'network-snapshot-{half}.pkl'),
                     batch=2 * PER_IDENTITY_BATCH)
    assert 'Restored optimizer state' in open(resumed / 'log.txt').read()
    for name in people.names:
        a, b = (load_file(str(run / 'adapters' / f'{name}-{tag}.safetensors')) for run in (multi, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_with_other_identities_is_refused(people, multi, tmp_path):
    half = f'000000.{STEPS * PER_IDENTITY_BATCH:03d}'
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--data={os.path.join(people.people, "person_0")}',
                                             f'--resume={multi / f"network-snapshot-{half}.pkl"}'] + TINY)
    assert result.exit_code != 0 and "identities ['person_0', 'person_1']" in result.output
    assert os.listdir(tmp_path) == []


def test_validation_scores_each_identity_and_keeps_its_best_adapter(people, tmp_path):
    """--val-data with one folder per identity: per-identity scores, per-identity best files, a best snapshot."""
    run = _train(tmp_path, people.people, people.base_pkl, batch=2, extra=[f'--val-data={people.heldout}'])
    stats = [json.loads(line) for line in open(run / 'stats.jsonl')]
    assert all(f'val/{name}/mse' in s and f'val/{name}/psnr' in s for s in stats for name in people.names)
    record = json.load(open(run / 'best.json'))
    for name in people.names:
        best = min(stats, key=lambda s: s[f'val/{name}/loss'])
        assert record[name]['step'] == best['step'] and record[name]['files'] == [f'adapters/{name}-best.safetensors']
        assert (run / 'adapters' / f'{name}-best.safetensors').is_file()
    assert record['run']['step'] == min(stats, key=lambda s: s['val/loss'])['step']
    assert (run / 'network-snapshot-best.pkl').is_file() and not (run / 'adapter-best.safetensors').exists()


def test_two_identities_in_one_run_take_the_sgd_steps_of_two_single_runs(people, tmp_path, monkeypatch):
    """The exact version of the comparison above: with Adam turned into SGD (test_train_distributed's recipe),
    each adapter's update in a two-identity run of batch 4 is the update of its identity's run alone at batch 2.
    Adam would hide a wrong gradient scale (the K factor on the loss); SGD moves by the gradient itself. Every
    chunk draws the renderer's randomness from its step's seed (not the chunk's), so that an identity's samples
    (chunks 0 and 2 of the two-identity batch, 0 and 1 alone) see the same random draws in both runs. Every B
    factor moves in the first step (a wrong scale shows there); some A factors of these people barely move in
    the second, so A's updates are compared but not required to be large."""
    from test_train_distributed import _assert_same_gradients, _sgd_adapters
    from training import train_step
    real_chunk_seed = train_step.chunk_seed
    monkeypatch.setattr(train_step, 'chunk_seed', lambda random_seed, step, chunk: real_chunk_seed(random_seed, step, 0))
    multi = _sgd_adapters(people.people, people.base_pkl, tmp_path / 'multi', 1, 4, monkeypatch)
    assert sorted(multi) == sorted(f'{name}-000000.00{n}.safetensors' for name in people.names for n in (4, 8))
    for name in people.names:
        alone = _sgd_adapters(os.path.join(people.people, name), people.base_pkl, tmp_path / name, 1, 2, monkeypatch)
        assert sorted(alone) == ['adapter-000000.002.safetensors', 'adapter-000000.004.safetensors']
        as_in_multi = {f'{name}-000000.00{2 * n}.safetensors': alone[f'adapter-000000.00{n}.safetensors'] for n in (2, 4)}
        _assert_same_gradients({file: multi[file] for file in as_in_multi}, as_in_multi, moving=('lora_B',))
