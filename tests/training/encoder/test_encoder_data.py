"""training/encoder/data.py: generator samples and folders of photos, checked before training."""
import json

import numpy as np
import PIL.Image
import pytest
import torch

from training import inference as inf
from training.encoder.data import FolderSet, generator_batch, sample_cameras
from training.synthetic_identity import build_tiny_generator


def write_folder(folder, sizes, labelled, latent_for=()):
    folder.mkdir(parents=True)
    labels = []
    for i, size in enumerate(sizes):
        name = f'image_{i}.png'
        PIL.Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(folder / name)
        if i in labelled:
            labels.append([name, list(np.eye(4).reshape(-1)) + [4.26, 0, 0.5, 0, 4.26, 0.5, 0, 0, 1]])
        if i in latent_for:
            np.save(folder / f'image_{i}_latent.npy', np.ones((1, 14, 512), np.float32) * i)
    (folder / 'dataset.json').write_text(json.dumps({'labels': labels}))


def test_folders_give_photos_cameras_and_optional_latents(tmp_path):
    write_folder(tmp_path / 'a', [128, 128], labelled={0, 1}, latent_for={1})
    data = FolderSet([str(tmp_path / 'a')], resolution=128, num_ws=14, w_dim=512)
    batch = data.batch(np.array([0, 1]))
    assert batch.images.shape == (2, 3, 128, 128) and batch.cameras.shape == (2, 25)
    assert batch.has_ws.tolist() == [False, True] and float(batch.ws[1].mean()) == 1.0


def test_wrong_resolution_and_missing_label_name_the_file(tmp_path):
    write_folder(tmp_path / 'a', [128, 64, 128], labelled={0, 1})
    with pytest.raises(inf.InputError) as err:
        FolderSet([str(tmp_path / 'a')], resolution=128, num_ws=14, w_dim=512)
    message = str(err.value)
    assert 'image_1.png: image is 64x64' in message
    assert 'image_2.png: no camera label' in message and 'dataset.json' in message


def test_generator_samples_are_a_function_of_the_seed():
    G = build_tiny_generator(0)
    a = generator_batch(G, 2, seed=7, psi_range=(0.5, 0.5), neural_rendering_resolution=16)
    b = generator_batch(G, 2, seed=7, psi_range=(0.5, 0.5), neural_rendering_resolution=16)
    assert torch.equal(a.images, b.images) and torch.equal(a.ws, b.ws) and bool(a.has_ws.all())
    assert a.images.shape == (2, 3, 128, 128)
    yaw_sign = torch.sign(sample_cameras(G, 200, seed=1)[:, 3])  # camera x position: both sides of the face
    assert (yaw_sign > 0).any() and (yaw_sign < 0).any()
