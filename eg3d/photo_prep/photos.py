"""Find a person's photos and read them as upright RGB arrays."""
from pathlib import Path
from typing import List

import numpy as np
import PIL.Image
import PIL.ImageOps

PHOTO_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff')


class PhotoError(Exception):
    """A photo that cannot be used; the message is the reason given in the report."""


def find_photos(folder: Path) -> List[Path]:
    """Every file under `folder` (recursively, hidden files skipped), sorted. Files that are not photos are
    returned too, so that the report can say why each was rejected."""
    return sorted(p for p in folder.rglob('*') if p.is_file()
                  and not any(part.startswith('.') for part in p.relative_to(folder).parts))


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16-bit and 32-bit grey are scaled down, not clipped; transparency is laid on
    white."""
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith('I;16') or values.max() > 255 else 255.0
        grey = np.clip(np.round(values / peak * 255.0), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(grey, 'L').convert('RGB')
    if image.mode == 'F':
        values = np.asarray(image, dtype=np.float64)
        peak = 1.0 if values.max() <= 1.0 else 255.0
        return PIL.Image.fromarray(np.clip(values / peak * 255.0, 0, 255).astype(np.uint8), 'L').convert('RGB')
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = image.convert('RGBA')
        background = PIL.Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert('RGB')
    return image.convert('RGB')


def load_photo(path: Path) -> np.ndarray:
    """The photo as uint8 [H, W, 3], turned upright by its EXIF orientation; PhotoError if it is not a readable
    image."""
    if path.suffix.lower() not in PHOTO_SUFFIXES:
        raise PhotoError(f'not an image (suffix {path.suffix or "none"}; accepted: {", ".join(PHOTO_SUFFIXES)})')
    try:
        with PIL.Image.open(path) as image:
            image.load()
            upright = PIL.ImageOps.exif_transpose(image)
            rgb = _to_rgb(upright)
    except PIL.UnidentifiedImageError:
        raise PhotoError('not an image (Pillow cannot identify it)') from None
    except (OSError, ValueError, SyntaxError) as err:
        raise PhotoError(f'corrupt image ({err})') from None
    if min(rgb.size) < 16:
        raise PhotoError(f'image too small ({rgb.size[0]}x{rgb.size[1]})')
    return np.asarray(rgb)
