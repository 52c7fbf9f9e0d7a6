"""Identity dataset: reading, W/W+ latents, mirroring, batch order, and one error naming every bad file."""
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest

from training.dataset import (DatasetError, IdentityDataset, IdentitySet, balanced_batch_indices, batch_indices,
                              identity_folders, mirror_camera, read_identity)

R, NUM_WS, W_DIM = 16, 4, 8


def _camera(yaw: float = 0.1) -> list:
    pose = np.eye(4)
    pose[0, :3] = [np.cos(yaw), 0.3, np.sin(yaw)]
    pose[:3, 3] = [0.4, -0.2, 2.7]
    return pose.reshape(-1).tolist() + [4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1]


def _write(folder, n=3, latent_shape=(1, NUM_WS, W_DIM), size=(R, R), labels=None):
    os.makedirs(folder, exist_ok=True)
    rnd = np.random.RandomState(0)
    entries = []
    for i in range(n):
        PIL.Image.fromarray(rnd.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(os.path.join(folder, f'image_{i}.png'))
        np.save(os.path.join(folder, f'image_{i}_latent.npy'), rnd.randn(*latent_shape).astype(np.float32))
        entries.append([f'image_{i}.png', _camera(0.1 * i)])
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'labels': entries if labels is None else labels}, f)
    return folder


def _problems(path, **kwargs):
    with pytest.raises(DatasetError) as info:
        read_identity(str(path), resolution=R, num_ws=NUM_WS, w_dim=W_DIM, **kwargs)
    return str(info.value), info.value.problems


def test_reads_images_cameras_and_wplus_latents(tmp_path):
    path = _write(tmp_path / 'id')
    names, images, cameras, latents = read_identity(str(path), resolution=R, num_ws=NUM_WS, w_dim=W_DIM)
    assert names == ['image_0.png', 'image_1.png', 'image_2.png']
    assert images.shape == (3, 3, R, R) and images.dtype == np.uint8
    assert cameras.shape == (3, 25) and np.allclose(cameras[1], _camera(0.1))
    assert latents.shape == (3, NUM_WS, W_DIM)
    expected = np.asarray(PIL.Image.open(path / 'image_2.png')).transpose(2, 0, 1)
    assert np.array_equal(images[2], expected)
    assert np.array_equal(latents[0], np.load(path / 'image_0_latent.npy')[0])


@pytest.mark.parametrize('shape', [(W_DIM,), (1, W_DIM)])
def test_w_latents_are_repeated_to_every_layer(tmp_path, shape):
    path = _write(tmp_path / 'id', latent_shape=shape)
    _, _, _, latents = read_identity(str(path), resolution=R, num_ws=NUM_WS, w_dim=W_DIM)
    w = np.load(path / 'image_1_latent.npy').reshape(W_DIM)
    assert latents.shape == (3, NUM_WS, W_DIM) and np.array_equal(latents[1], np.tile(w, (NUM_WS, 1)))


def test_wplus_without_batch_axis(tmp_path):
    path = _write(tmp_path / 'id', latent_shape=(NUM_WS, W_DIM))
    assert read_identity(str(path), resolution=R, num_ws=NUM_WS, w_dim=W_DIM)[3].shape == (3, NUM_WS, W_DIM)


def test_zip_equals_folder(tmp_path):
    path = _write(tmp_path / 'id')
    with zipfile.ZipFile(tmp_path / 'id.zip', 'w') as z:
        for name in os.listdir(path):
            z.write(path / name, name)
    a = read_identity(str(path), resolution=R, num_ws=NUM_WS, w_dim=W_DIM)
    b = read_identity(str(tmp_path / 'id.zip'), resolution=R, num_ws=NUM_WS, w_dim=W_DIM)
    assert a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1:], b[1:]))


def test_source_folder_is_never_written(tmp_path):
    path = _write(tmp_path / 'id')
    before = {n: os.stat(path / n).st_mtime_ns for n in os.listdir(path)}
    IdentityDataset(str(path), resolution=R, num_ws=NUM_WS, w_dim=W_DIM, xflip=True)
    assert {n: os.stat(path / n).st_mtime_ns for n in os.listdir(path)} == before


# --- every bad input is reported with its file ---------------------------------------------------

def test_image_without_latent(tmp_path):
    path = _write(tmp_path / 'id')
    os.remove(path / 'image_1_latent.npy')
    msg, problems = _problems(path)
    assert ('image_1.png' in msg) and ('image_1_latent.npy' in msg) and len(problems) == 1


def test_image_without_label(tmp_path):
    path = _write(tmp_path / 'id')
    PIL.Image.fromarray(np.zeros((R, R, 3), np.uint8)).save(path / 'image_9.png')
    np.save(path / 'image_9_latent.npy', np.zeros((1, W_DIM), np.float32))
    msg, _ = _problems(path)
    assert 'image_9.png: image has no label in dataset.json' in msg


def test_label_without_image(tmp_path):
    path = _write(tmp_path / 'id')
    os.remove(path / 'image_0.png')
    msg, _ = _problems(path)
    assert 'image_0.png: is labelled in dataset.json but the file does not exist' in msg


@pytest.mark.parametrize('shape', [(1, W_DIM + 1), (NUM_WS + 1, W_DIM), (2, 2, NUM_WS, W_DIM)])
def test_latent_of_wrong_shape(tmp_path, shape):
    path = _write(tmp_path / 'id')
    np.save(path / 'image_2_latent.npy', np.zeros(shape, np.float32))
    msg, _ = _problems(path)
    assert f'image_2_latent.npy: latent has shape {list(shape)}' in msg


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_latent_with_nan_or_inf(tmp_path, bad):
    path = _write(tmp_path / 'id')
    latent = np.zeros((1, NUM_WS, W_DIM), np.float32)
    latent[0, 1, 2] = bad
    np.save(path / 'image_0_latent.npy', latent)
    msg, _ = _problems(path)
    assert 'image_0_latent.npy: latent contains NaN or inf' in msg


def test_unreadable_latent(tmp_path):
    path = _write(tmp_path / 'id')
    (path / 'image_0_latent.npy').write_bytes(b'not numpy')
    msg, _ = _problems(path)
    assert 'image_0_latent.npy: unreadable latent' in msg


def test_resolution_differs_from_generator(tmp_path):
    path = _write(tmp_path / 'id')
    PIL.Image.fromarray(np.zeros((2 * R, 2 * R, 3), np.uint8)).save(path / 'image_1.png')
    msg, _ = _problems(path)
    assert f'image_1.png: image is {2 * R}x{2 * R}; the generator renders {R}x{R}' in msg


def test_non_square_image(tmp_path):
    path = _write(tmp_path / 'id')
    PIL.Image.fromarray(np.zeros((R, R + 3, 3), np.uint8)).save(path / 'image_2.png')
    msg, _ = _problems(path)
    assert f'image_2.png: image is {R + 3}x{R}; it must be square' in msg


def test_unreadable_image(tmp_path):
    path = _write(tmp_path / 'id')
    (path / 'image_1.png').write_bytes(b'\x89PNG broken')
    msg, _ = _problems(path)
    assert 'image_1.png: unreadable image' in msg


@pytest.mark.parametrize('length', [16, 24, 26])
def test_label_of_wrong_length(tmp_path, length):
    labels = [[f'image_{i}.png', _camera()[:length] + [0.0] * max(0, length - 25)] for i in range(3)]
    labels[1][1] = (_camera() + [1.0] * 5)[:length]
    path = _write(tmp_path / 'id', labels=labels)
    msg, _ = _problems(path)
    assert f'image_1.png: label in dataset.json has {length} values; expected 25' in msg


def test_missing_dataset_json(tmp_path):
    path = _write(tmp_path / 'id')
    os.remove(path / 'dataset.json')
    msg, _ = _problems(path)
    assert 'dataset.json: missing' in msg


def test_invalid_dataset_json(tmp_path):
    path = _write(tmp_path / 'id')
    (path / 'dataset.json').write_text('{"labels": [')
    msg, _ = _problems(path)
    assert 'dataset.json: is not valid JSON' in msg
    (path / 'dataset.json').write_text('{"cameras": []}')
    msg, _ = _problems(path)
    assert 'dataset.json: has no "labels" list' in msg


def test_all_problems_are_listed_in_one_error(tmp_path):
    path = _write(tmp_path / 'id', n=5)
    os.remove(path / 'image_0_latent.npy')
    np.save(path / 'image_1_latent.npy', np.full((1, W_DIM), np.nan, np.float32))
    PIL.Image.fromarray(np.zeros((R, R + 1, 3), np.uint8)).save(path / 'image_2.png')
    (path / 'image_3.png').write_bytes(b'junk')
    msg, problems = _problems(path)
    assert [name for name, _ in problems] == ['image_0.png', 'image_1_latent.npy', 'image_2.png', 'image_3.png']
    assert msg.startswith(f"Dataset '{path}' has 4 problem(s):")


def test_missing_path(tmp_path):
    with pytest.raises(DatasetError, match='does not exist'):
        read_identity(str(tmp_path / 'nowhere'))

# --- mirroring and batches -----------------------------------------------------------------------


def test_mirror_camera_matches_eg3d_flip_yaw():
    label = np.asarray(_camera(0.3), np.float32)
    mirrored = mirror_camera(label)
    pose = label[:16].reshape(4, 4).copy()
    for i, j in [(0, 1), (0, 2), (1, 0), (2, 0), (0, 3)]:  # mirror_dataset.py flip_yaw
        pose[i, j] *= -1
    assert np.allclose(mirrored[:16], pose.reshape(-1)) and np.allclose(mirrored[16:], label[16:])
    assert np.allclose(mirror_camera(mirrored), label)


def test_mirror_adds_flipped_copies(tmp_path):
    path = _write(tmp_path / 'id')
    ds = IdentityDataset(str(path), resolution=R, num_ws=NUM_WS, w_dim=W_DIM, xflip=True)
    assert len(ds) == 6 and ds.names[3] == 'image_0_mirror.png'
    img, cam, ws = ds[4]
    img1, cam1, ws1 = ds[1]
    assert np.array_equal(img.numpy(), img1.numpy()[:, :, ::-1])
    assert np.allclose(cam.numpy(), mirror_camera(cam1.numpy())) and np.array_equal(ws.numpy(), ws1.numpy())


def test_batches_are_epochs_of_permutations_and_deterministic():
    seen = np.concatenate([batch_indices(10, 4, step, seed=3) for step in range(5)])
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:20].tolist()) == list(range(10))
    assert np.array_equal(batch_indices(10, 4, 3, seed=3), batch_indices(10, 4, 3, seed=3))
    assert not np.array_equal(seen[:10], np.concatenate([batch_indices(10, 4, s, seed=4) for s in range(3)])[:10])


# Folders of identities (multi-identity runs).

def test_folder_of_identities_is_read_as_one_set(tmp_path):
    _write(tmp_path / 'people' / 'bob', n=2)
    _write(tmp_path / 'people' / 'amy', n=3)
    ds = IdentitySet(str(tmp_path / 'people'), resolution=R, num_ws=NUM_WS, w_dim=W_DIM)
    assert ds.multi and ds.identity_names == ['amy', 'bob'] and ds.sizes == [3, 2]
    assert ds.identity.tolist() == [0, 0, 0, 1, 1] and len(ds) == 5 and ds.resolution == R and ds.name == 'people'
    image, camera, ws, identity = ds[3]
    assert identity == 1 and image.shape == (3, R, R) and camera.shape == (25,) and ws.shape == (NUM_WS, W_DIM)
    alone = IdentityDataset(str(tmp_path / 'people' / 'bob'), resolution=R, num_ws=NUM_WS, w_dim=W_DIM)
    assert np.array_equal(ds.images[3:], alone.images) and np.array_equal(ds.latents[3:], alone.latents)
    single = IdentitySet(str(tmp_path / 'people' / 'bob'), resolution=R, num_ws=NUM_WS, w_dim=W_DIM)
    assert not single.multi and single.identity_names == ['bob'] and single.identity.tolist() == [0, 0]


def test_zipped_identities_count(tmp_path):
    _write(tmp_path / 'src', n=2)
    os.makedirs(tmp_path / 'people')
    with zipfile.ZipFile(tmp_path / 'people' / 'zoe.zip', 'w') as z:
        for name in os.listdir(tmp_path / 'src'):
            z.write(tmp_path / 'src' / name, name)
    _write(tmp_path / 'people' / 'amy', n=1)
    assert identity_folders(str(tmp_path / 'people')) == [('amy', str(tmp_path / 'people' / 'amy')),
                                                          ('zoe', str(tmp_path / 'people' / 'zoe.zip'))]


def test_problems_of_every_identity_are_listed_with_their_folder(tmp_path):
    _write(tmp_path / 'people' / 'amy', n=2)
    _write(tmp_path / 'people' / 'bob', n=2)
    os.remove(tmp_path / 'people' / 'amy' / 'image_1_latent.npy')
    np.save(tmp_path / 'people' / 'bob' / 'image_0_latent.npy', np.full((1, NUM_WS, W_DIM), np.nan, np.float32))
    os.makedirs(tmp_path / 'people' / 'notes')
    with pytest.raises(DatasetError) as info:
        IdentitySet(str(tmp_path / 'people'), resolution=R, num_ws=NUM_WS, w_dim=W_DIM)
    files = [f for f, _ in info.value.problems]
    assert files == ['notes/dataset.json']  # the folder layout is checked first
    os.rmdir(tmp_path / 'people' / 'notes')
    with pytest.raises(DatasetError) as info:
        IdentitySet(str(tmp_path / 'people'), resolution=R, num_ws=NUM_WS, w_dim=W_DIM)
    files = [f for f, _ in info.value.problems]
    assert 'amy/image_1.png' in files and 'bob/image_0_latent.npy' in files
    assert str(tmp_path / 'people') in str(info.value)


def test_balanced_batches_give_each_identity_its_own_single_run_order():
    sizes, K = [5, 3, 4], 3
    for step in range(6):
        assert np.array_equal(balanced_batch_indices([7], 4, step, 2)[1], batch_indices(7, 4, step, seed=2))
        identity, within = balanced_batch_indices(sizes, 6, step, seed=2)
        assert np.bincount(identity, minlength=K).tolist() == [2, 2, 2]
        for k in range(K):
            assert np.array_equal(within[identity == k], batch_indices(sizes[k], 2, step, seed=2))
    identity = np.concatenate([balanced_batch_indices(sizes, 4, s, seed=0)[0] for s in range(3)])
    assert np.bincount(identity).tolist() == [4, 4, 4]  # batch 4 with 3 identities: balanced over 12 samples
