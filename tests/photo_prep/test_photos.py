"""Reading photos: EXIF orientation, every Pillow mode a phone or album gives, and clear reasons for bad files."""
import numpy as np
import PIL.Image
import pytest

from photo_prep import photos


def _pattern():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)


def test_exif_orientation_is_applied(tmp_path):
    upright = _pattern()
    image = PIL.Image.fromarray(upright).transpose(PIL.Image.Transpose.ROTATE_90)  # stored sideways
    exif = PIL.Image.Exif()
    exif[0x0112] = 6       # "rotate 90 clockwise to display"
    path = tmp_path / 'sideways.jpg'
    image.save(path, exif=exif, quality=100, subsampling=0)
    loaded = photos.load_photo(path)
    assert loaded.shape == upright.shape
    assert np.abs(loaded.astype(int) - upright).mean() < 12       # JPEG noise only


@pytest.mark.parametrize('mode', ['L', 'P', 'RGBA', 'CMYK', 'I;16', 'LA'])
def test_every_mode_becomes_rgb(tmp_path, mode):
    rgb = PIL.Image.fromarray(_pattern())
    if mode == 'I;16':
        image = PIL.Image.fromarray(np.asarray(rgb.convert('L')).astype(np.uint16) * 257)
    else:
        image = rgb.convert(mode)
    suffix = '.tiff' if mode == 'CMYK' else '.png'
    path = tmp_path / f'photo{suffix}'
    image.save(path)
    loaded = photos.load_photo(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (40, 60, 3)
    if mode in ('L', 'I;16', 'LA'):
        assert np.abs(loaded[..., 0].astype(int) - np.asarray(rgb.convert('L'))).max() <= 1


def test_not_an_image_and_corrupt_files_give_reasons(tmp_path):
    (tmp_path / 'notes.txt').write_text('hello')
    with pytest.raises(photos.PhotoError, match='not an image'):
        photos.load_photo(tmp_path / 'notes.txt')
    (tmp_path / 'fake.jpg').write_bytes(b'this is no jpeg')
    with pytest.raises(photos.PhotoError, match='not an image'):
        photos.load_photo(tmp_path / 'fake.jpg')
    good = tmp_path / 'good.png'
    PIL.Image.fromarray(_pattern()).save(good)
    truncated = tmp_path / 'truncated.png'
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(photos.PhotoError, match='corrupt'):
        photos.load_photo(truncated)


def test_photos_are_found_recursively_without_hidden_files(tmp_path):
    (tmp_path / 'a' / 'b').mkdir(parents=True)
    (tmp_path / 'a' / 'b' / 'x.jpg').write_bytes(b'')
    (tmp_path / 'y.png').write_bytes(b'')
    (tmp_path / '.hidden.png').write_bytes(b'')
    assert [p.relative_to(tmp_path).as_posix() for p in photos.find_photos(tmp_path)] == ['a/b/x.jpg', 'y.png']
