"""training/dataset_files.py: the one strict reader of dataset.json and latents, and the tools that use it."""
import io
import json
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest

from training import dataset_files as df

NUM_WS, W_DIM = 4, 8
CAMERA = list(np.eye(4).reshape(-1)) + [4.26, 0, 0.5, 0, 4.26, 0.5, 0, 0, 1]


def _labels(*entries) -> bytes:
    return json.dumps({'labels': list(entries)}).encode()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_labels_are_float32_cameras_by_image_name():
    labels, problems = df.parse_labels(_labels(['image_0.png', CAMERA], ['image_1.png', [2 * v for v in CAMERA]]))
    assert problems == [] and sorted(labels) == ['image_0.png', 'image_1.png']
    assert labels['image_1.png'].dtype == np.float32 and labels['image_1.png'].shape == (25,)
    np.testing.assert_array_equal(labels['image_1.png'], np.float32(CAMERA) * 2)


def test_every_bad_entry_is_a_problem_named_by_its_image_and_maps_to_none():
    labels, problems = df.parse_labels(_labels(
        ['short.png', CAMERA[:16]], ['nan.png', [float('nan')] + CAMERA[1:]], ['text.png', ['a'] * 25],
        ['nested.png', [CAMERA]], ['x.png'], ['twice.png', CAMERA], ['twice.png', CAMERA]))
    assert dict(problems) == {
        'short.png': 'label in dataset.json has 16 values; expected 25 (cam2world 4x4 row-major + intrinsics 3x3)',
        'nan.png': 'label in dataset.json contains NaN or inf',
        'text.png': 'label in dataset.json is not a list of numbers',
        'nested.png': 'label in dataset.json is nested; expected a flat list of 25 numbers',
        'dataset.json': "label entry \"['x.png']\" is not [filename, [25 floats]]",
        'twice.png': 'appears more than once in dataset.json'}
    assert {name for name, label in labels.items() if label is None} == {'short.png', 'nan.png', 'text.png',
                                                                         'nested.png'}
    assert labels['twice.png'] is not None


@pytest.mark.parametrize('raw, message', [(b'{"labels": [', 'is not valid JSON'), (b'\xff', 'is not valid JSON'),
                                          (b'{"cameras": []}', 'has no "labels" list'), (b'[1]', 'has no "labels"')])
def test_an_unusable_dataset_json_is_one_problem_of_the_file(raw, message):
    with pytest.raises(df.FileProblem) as err:
        df.parse_labels(raw)
    assert err.value.file == 'dataset.json' and message in err.value.message


@pytest.mark.parametrize('shape', [(W_DIM,), (1, W_DIM), (NUM_WS, W_DIM), (1, NUM_WS, W_DIM)])
def test_w_and_w_plus_latents_become_num_ws_layers(shape):
    w = np.arange(W_DIM, dtype=np.float64)
    ws = df.parse_latent(_npy(np.broadcast_to(w, shape).copy()), 'image_0_latent.npy', NUM_WS, W_DIM)
    assert ws.dtype == np.float32 and ws.shape == (NUM_WS, W_DIM)
    np.testing.assert_array_equal(ws, np.broadcast_to(np.float32(w), (NUM_WS, W_DIM)))


def test_without_a_generator_the_file_gives_the_layers_and_the_width():
    assert df.parse_latent(_npy(np.zeros((1, W_DIM), np.float32)), 'a', None, W_DIM).shape == (1, W_DIM)
    assert df.parse_latent(_npy(np.zeros((1, 6, 5), np.float32)), 'a', None, None).shape == (6, 5)


@pytest.mark.parametrize('array, message', [
    (np.zeros((1, NUM_WS + 1, W_DIM), np.float32),
     f'latent has shape [1, {NUM_WS + 1}, {W_DIM}]; expected W [{W_DIM}] or [1, {W_DIM}], '
     f'or W+ [{NUM_WS}, {W_DIM}] or [1, {NUM_WS}, {W_DIM}]'),
    (np.zeros((NUM_WS * W_DIM,), np.float32), f'latent has shape [{NUM_WS * W_DIM}]'),
    (np.zeros((1, W_DIM), np.int64), 'latent has dtype int64; expected a float array'),
    (np.full((1, W_DIM), np.inf, np.float32), 'latent contains NaN or inf'),
])
def test_a_bad_latent_names_its_file_and_the_problem(array, message):
    with pytest.raises(df.FileProblem) as err:
        df.parse_latent(_npy(array), 'image_3_latent.npy', NUM_WS, W_DIM)
    assert err.value.file == 'image_3_latent.npy' and err.value.message.startswith(message)


def test_an_unreadable_latent_is_a_problem_not_a_pickle():
    with pytest.raises(df.FileProblem, match='image_3_latent.npy: unreadable latent'):
        df.parse_latent(b'not numpy', 'image_3_latent.npy', NUM_WS, W_DIM)
    with pytest.raises(df.FileProblem, match='unreadable latent'):  # object arrays would unpickle: refused
        df.parse_latent(_npy(np.array([{'w': 1}], dtype=object)), 'image_3_latent.npy', NUM_WS, W_DIM)


def _identity_folder(folder, latent: np.ndarray, camera=CAMERA):
    folder.mkdir()
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / 'image_0.png')
    np.save(folder / 'image_0_latent.npy', latent)
    (folder / 'dataset.json').write_text(json.dumps({'labels': [['image_0.png', camera]]}))
    return folder


def test_every_reader_gives_the_same_strict_answer(tmp_path):
    """The training data, the inference tools, the encoder's data and edit.py all reject the same files with
    the same message: a flat latent (the encoder's reader once reshaped it) and a NaN camera (inference once
    took it)."""
    import edit
    from training import inference as inf
    from training.dataset import DatasetError, read_identity
    from training.encoder.data import FolderSet
    flat = _identity_folder(tmp_path / 'flat', np.zeros((NUM_WS * W_DIM,), np.float32))
    expected = f'latent has shape [{NUM_WS * W_DIM}]; expected'
    with pytest.raises(DatasetError, match=r'image_0_latent.npy: latent has shape \[32\]; expected'):
        read_identity(str(flat), num_ws=NUM_WS, w_dim=W_DIM)
    with pytest.raises(inf.InputError) as err:
        FolderSet([str(flat)], resolution=16, num_ws=NUM_WS, w_dim=W_DIM)
    assert f'{flat / "image_0_latent.npy"}: {expected}' in str(err.value)
    G = SimpleNamespace(w_dim=W_DIM, backbone=SimpleNamespace(mapping=SimpleNamespace(num_ws=NUM_WS)))  # its sizes
    with pytest.raises(inf.InputError) as err:
        inf.load_latent(flat / 'image_0_latent.npy', G)
    assert f'{flat / "image_0_latent.npy"}: {expected}' in str(err.value)

    nan = _identity_folder(tmp_path / 'nan', np.zeros((1, W_DIM), np.float32), camera=[float('nan')] + CAMERA[1:])
    with pytest.raises(DatasetError, match='image_0.png: label in dataset.json contains NaN or inf'):
        read_identity(str(nan), num_ws=NUM_WS, w_dim=W_DIM)
    with pytest.raises(inf.InputError, match='image_0.png: label in dataset.json contains NaN or inf'):
        inf.read_labels(nan)
    np.save(nan / 'image_0_latent.npy', np.full((1, W_DIM), np.nan, np.float32))
    with pytest.raises(inf.InputError, match='image_0_latent.npy: latent contains NaN or inf'):
        edit.read_latent_set(str(nan))
