"""prepare_dataset.py on real faces: crops and cameras against EG3D's own labels, every rejection reason, the
folder's safety rules, and the chain photos -> prepared folder with latents -> train.py."""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest
from click.testing import CliRunner

import camera_utils
import prepare_dataset
import train
from photo_prep import placement
from training import synthetic_identity as si

FACES = Path(__file__).resolve().parent / 'data' / 'faces'
REPORT_KEYS = {'source', 'status', 'reason', 'image', 'quad', 'yaw', 'pitch', 'roll', 'identity_similarity',
               'sharpness'}


def _faces():
    labels = {name: np.array(label) for name, label in json.loads((FACES / 'dataset.json').read_text())['labels']}
    return {name: np.asarray(PIL.Image.open(FACES / name).convert('RGB')) for name in sorted(labels)}, labels


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(pixels).save(path)


def _run(*args):
    return CliRunner().invoke(prepare_dataset.main, [str(a) for a in args], catch_exceptions=False)


def _report(outdir: Path) -> dict:
    return {p['source']: p for p in json.loads((outdir / 'prepare_report.json').read_text())['photos']}


@pytest.fixture(scope='module')
def photo_set(tmp_path_factory):
    """The five real faces placed in larger photos, plus one photo for every rejection reason."""
    root = tmp_path_factory.mktemp('photos')
    crops, labels = _faces()
    rng = np.random.default_rng(7)
    truth = {}
    for name, pixels in crops.items():
        photo, quad = placement.place_crop(pixels, rng)
        _save(root / f'{Path(name).stem}.png', photo)
        truth[f'{Path(name).stem}.png'] = (quad, labels[name])
    first = crops['eg3dprojector_00612.png']
    photo, _ = placement.place_crop(first, rng)
    _save(root / 'rejects' / 'small.png', np.asarray(PIL.Image.fromarray(photo).resize(
        (photo.shape[1] // 3, photo.shape[0] // 3), PIL.Image.LANCZOS)))
    _save(root / 'rejects' / 'blurry.png', np.asarray(PIL.Image.fromarray(placement.place_crop(
        crops['eg3dprojector_00064.png'], rng)[0]).filter(PIL.ImageFilter.GaussianBlur(6))))
    shutil.copy(root / 'eg3dprojector_00018.png', root / 'rejects' / 'z_copy_of_00018.png')
    _save(root / 'rejects' / 'wall.png', np.full((300, 400, 3), 180, np.uint8))
    (root / 'rejects' / 'notes.txt').write_text('not a photo')
    (root / 'rejects' / 'broken.jpg').write_bytes((root / 'eg3dprojector_R.png').read_bytes()[:500])
    return root, truth


@pytest.fixture(scope='module')
def prepared(photo_set, tmp_path_factory):
    root, truth = photo_set
    outdir = tmp_path_factory.mktemp('prepared') / 'person'
    result = _run(f'--photos={root}', f'--outdir={outdir}', '--skip-latents', '--no-identity-filter')
    assert result.exit_code == 0, result.output
    return outdir, _report(outdir), truth


def test_report_layout_and_kept_faces(prepared):
    outdir, report, truth = prepared
    for entry in report.values():
        assert set(entry) == REPORT_KEYS
    kept = [e for e in report.values() if e['status'] == 'kept']
    assert sorted(e['source'] for e in kept) == sorted(truth)
    assert sorted(e['image'] for e in kept) == [f'image_{i}.png' for i in range(5)]
    labels = dict(json.loads((outdir / 'dataset.json').read_text())['labels'])
    for entry in kept:
        image = PIL.Image.open(outdir / entry['image'])
        assert image.size == (512, 512) and image.mode == 'RGB'
        assert len(labels[entry['image']]) == 25
    assert (outdir / 'contact_sheet.png').is_file()


def test_crops_and_cameras_match_eg3d_labels(prepared):
    _, report, truth = prepared
    quad_errors, angles = [], []
    for source, (quad, label) in truth.items():
        entry = report[source]
        quad_errors.append(placement.quad_error(np.array(entry['quad']), quad))
        direction = camera_utils.direction_from_yaw_pitch(math.radians(entry['yaw']), math.radians(entry['pitch']))
        angles.append(math.degrees(math.acos(np.clip(direction @ camera_utils.viewing_direction(label), -1, 1))))
    # The acceptance figures are measured by bench/prepare_dataset.py; these bounds catch a broken convention.
    assert np.mean(quad_errors) < 0.02 and max(quad_errors) < 0.035, quad_errors
    assert np.mean(angles) < 5 and max(angles) < 12, angles


def test_every_rejection_has_its_reason(prepared):
    _, report, _ = prepared
    reasons = {source: entry['reason'] for source, entry in report.items() if entry['status'] == 'rejected'}
    assert reasons['rejects/small.png'].startswith('face too small')
    assert reasons['rejects/blurry.png'].startswith('blurry')
    assert reasons['rejects/z_copy_of_00018.png'] == 'near-duplicate of eg3dprojector_00018.png'
    assert reasons['rejects/wall.png'] == 'no face found'
    assert reasons['rejects/notes.txt'].startswith('not an image')
    assert reasons['rejects/broken.jpg'].startswith(('corrupt', 'not an image'))
    assert len(reasons) == 6


def test_other_people_are_rejected_by_the_identity_filter(tmp_path):
    crops, _ = _faces()
    rng = np.random.default_rng(3)
    for i in range(3):
        _save(tmp_path / 'photos' / f'me_{i}.png', placement.place_crop(crops['eg3dprojector_00612.png'], rng)[0])
    _save(tmp_path / 'photos' / 'someone_else.png', placement.place_crop(crops['eg3dprojector_00064.png'], rng)[0])
    result = _run(f'--photos={tmp_path / "photos"}', f'--outdir={tmp_path / "out"}', '--skip-latents', '--no-dedupe')
    assert result.exit_code == 0, result.output
    report = _report(tmp_path / 'out')
    assert report['someone_else.png']['reason'].startswith('other person')
    assert all(report[f'me_{i}.png']['status'] == 'kept' for i in range(3))
    assert all(report[f'me_{i}.png']['identity_similarity'] > 0.9 for i in range(3))


def test_bad_folders_are_errors_that_name_the_folder_and_list_reasons(tmp_path):
    junk = tmp_path / 'junk'
    junk.mkdir()
    (junk / 'a.jpg').write_bytes(b'garbage')
    _save(junk / 'b.png', np.full((64, 64, 3), 30, np.uint8))
    result = _run(f'--photos={junk}', f'--outdir={tmp_path / "out"}', '--skip-latents')
    assert result.exit_code != 0
    assert str(junk) in result.output and 'a.jpg: not an image' in result.output and 'b.png: no face found' in result.output
    assert not (tmp_path / 'out').exists()
    result = _run(f'--photos={tmp_path / "missing"}', f'--outdir={tmp_path / "out"}', '--skip-latents')
    assert result.exit_code != 0 and 'folder not found' in result.output


def test_a_non_empty_outdir_is_never_overwritten(photo_set, tmp_path):
    root, _ = photo_set
    outdir = tmp_path / 'mine'
    outdir.mkdir()
    (outdir / 'precious.txt').write_text('keep me')
    result = _run(f'--photos={root}', f'--outdir={outdir}', '--skip-latents')
    assert result.exit_code != 0 and 'not empty' in result.output
    result = _run(f'--photos={root}', f'--outdir={outdir}', '--skip-latents', '--resume')
    assert result.exit_code != 0 and 'prepare_report.json' in result.output
    assert sorted(os.listdir(outdir)) == ['precious.txt']


def test_photos_to_latents_to_training(tmp_path):
    """The whole chain on real faces: prepare_dataset.py with latents on a tiny base, an interrupted run resumed,
    then train.py for a few steps on the folder it wrote."""
    crops, _ = _faces()
    rng = np.random.default_rng(5)
    for name in ['eg3dprojector_00018.png', 'eg3dprojector_00612.png', 'eg3dprojector_R.png']:
        _save(tmp_path / 'photos' / name, placement.place_crop(crops[name], rng)[0])
    base = tmp_path / 'base.pkl'
    si.save_generator_pkl(si.build_tiny_generator(0), str(base))
    outdir = tmp_path / 'person'
    latent_flags = [f'--network={base}', '--num-steps=2', '--w-avg-samples=50', '--lpips=none', '--nrr=32',
                    '--device=cpu']
    result = _run(f'--photos={tmp_path / "photos"}', f'--outdir={outdir}', '--no-identity-filter', *latent_flags)
    assert result.exit_code == 0, result.output
    latents = sorted(outdir.glob('image_*_latent.npy'))
    assert len(latents) == 3 and np.load(latents[0]).shape == (1, 14, 512)
    assert PIL.Image.open(outdir / 'image_0.png').size == (128, 128)     # the generator's resolution
    # An interrupted run: one latent missing. --resume projects only that one and keeps the others.
    kept_mtime = latents[0].stat().st_mtime_ns
    latents[2].unlink()
    result = _run(f'--photos={tmp_path / "photos"}', f'--outdir={outdir}', '--no-identity-filter', '--resume',
                  *latent_flags)
    assert result.exit_code == 0, result.output
    assert latents[2].is_file() and latents[0].stat().st_mtime_ns == kept_mtime
    result = CliRunner().invoke(train.main, [
        f'--outdir={tmp_path / "runs"}', f'--data={outdir}', f'--resume={base}', '--cfg=resume', '--device=cpu',
        '--lpips=none', '--neural_rendering_resolution_initial=32', '--progress=False', '--lora=1', '--batch=1',
        '--kimg=0.002', '--tick=0.001', '--snap=1'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = next((tmp_path / 'runs').iterdir())
    assert list(run.glob('adapter-*.safetensors'))


def test_a_photo_stored_sideways_is_aligned_upright(tmp_path):
    crops, _ = _faces()
    photo, quad = placement.place_crop(crops['eg3dprojector_00612.png'], np.random.default_rng(11))
    sideways = PIL.Image.fromarray(photo).transpose(PIL.Image.Transpose.ROTATE_90)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6       # the camera's "rotate 90 degrees clockwise to display"
    (tmp_path / 'photos').mkdir()
    sideways.save(tmp_path / 'photos' / 'phone.jpg', exif=exif, quality=95)
    result = _run(f'--photos={tmp_path / "photos"}', f'--outdir={tmp_path / "out"}', '--skip-latents')
    assert result.exit_code == 0, result.output
    entry = _report(tmp_path / 'out')['phone.jpg']
    true_roll = math.degrees(math.atan2(quad[1, 1] - quad[0, 1], quad[1, 0] - quad[0, 0]))
    assert entry['status'] == 'kept' and abs(entry['roll'] - true_roll) < 2
    assert placement.quad_error(np.array(entry['quad']), quad) < 0.03    # in the upright photo's coordinates


def test_latents_can_start_from_an_encoder(tmp_path):
    import torch
    from training import inference as inf
    from training.encoder import EncoderConfig, W3DEncoder, encode, load, save
    crops, _ = _faces()
    _save(tmp_path / 'photos' / 'me.png', placement.place_crop(crops['eg3dprojector_00064.png'],
                                                               np.random.default_rng(2))[0])
    G = si.build_tiny_generator(0)
    si.save_generator_pkl(G, str(tmp_path / 'base.pkl'))
    torch.manual_seed(0)
    encoder = W3DEncoder(EncoderConfig.for_generator(inf.num_ws(G), G.w_dim, G.img_resolution))
    with torch.no_grad():
        for head in encoder.heads:
            head.linear.weight.normal_(0, 0.02)      # a trained encoder's heads are not zero
    save(str(tmp_path / 'encoder.safetensors'), encoder, G.backbone.mapping.w_avg.repeat(inf.num_ws(G), 1), G,
         training={'iters': 2, 'neural_rendering_resolution': 16})
    result = _run(f'--photos={tmp_path / "photos"}', f'--outdir={tmp_path / "out"}', f'--network={tmp_path / "base.pkl"}',
                  f'--encoder={tmp_path / "encoder.safetensors"}', '--num-steps=0', '--lpips=none',
                  '--w-avg-samples=50', '--device=cpu')
    assert result.exit_code == 0, result.output
    written = np.load(tmp_path / 'out' / 'image_0_latent.npy')
    G = inf.load_generator(tmp_path / 'base.pkl')
    encoder, w_avg, _ = load(str(tmp_path / 'encoder.safetensors'), G)
    c = torch.from_numpy(inf.label_for_image(tmp_path / 'out' / 'image_0.png')).unsqueeze(0)
    expected = encode(G, encoder, w_avg, inf.load_image(tmp_path / 'out' / 'image_0.png'), c, 2, 16)[-1].ws
    assert np.allclose(written, expected.numpy(), atol=1e-5)
    import projector
    projector_start = projector.w_statistics(G, c, 50)[0].expand(1, 14, -1)
    assert not np.allclose(written, projector_start.numpy(), atol=1e-3)  # not the projector's own w_avg start
