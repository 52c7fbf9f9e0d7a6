"""contact_sheet.png: every kept crop with its camera drawn on it, every rejected photo with its reason."""
import textwrap
from typing import List

import numpy as np
import PIL.Image
import PIL.ImageDraw

import camera_utils
from photo_prep import template
from photo_prep.pipeline import PhotoRecord

TILE = 160
CAPTION = 44
COLUMNS = 8
AXIS_LENGTH = 0.25    # world units


def _draw_pose(tile: PIL.Image.Image, label: np.ndarray) -> None:
    """The head's axes (x red, y green, z blue: the face's forward) and the template's landmarks, as the label's
    camera sees them: if the label is right they sit on the face and the blue axis leaves the nose."""
    draw = PIL.ImageDraw.Draw(tile)
    nose = template.world_points()[30]
    ends = nose + AXIS_LENGTH * np.eye(3)
    points = camera_utils.project_points(label, np.concatenate([nose[None], ends])) * tile.width
    for end, colour in zip(points[1:], [(255, 40, 40), (40, 220, 40), (60, 120, 255)]):
        draw.line([tuple(points[0]), tuple(end)], fill=colour, width=2)
    for x, y in camera_utils.project_points(label, template.world_points()[template.FIT_POINTS]) * tile.width:
        draw.point((x, y), fill=(255, 255, 0))


def _tile(record: PhotoRecord) -> PIL.Image.Image:
    tile = PIL.Image.new('RGB', (TILE, TILE + CAPTION), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(tile)
    if record.status == 'kept':
        face = PIL.Image.fromarray(record.crop).resize((TILE, TILE), PIL.Image.BILINEAR)
        _draw_pose(face, record.label)
        tile.paste(face, (0, 0))
        caption = f'{record.image}\nyaw {record.yaw:+.0f} pitch {record.pitch:+.0f}'
        colour = (0, 90, 0)
    else:
        if record.preview is not None:
            preview = PIL.Image.fromarray(record.preview)
            tile.paste(preview, ((TILE - preview.width) // 2, (TILE - preview.height) // 2))
        draw.rectangle([0, 0, TILE - 1, TILE - 1], outline=(200, 0, 0), width=3)
        caption = '\n'.join(textwrap.wrap(f'{record.source}: {record.reason}', 30)[:3])
        colour = (170, 0, 0)
    draw.multiline_text((3, TILE + 2), caption, fill=colour, spacing=1)
    return tile


def render(records: List[PhotoRecord]) -> np.ndarray:
    """The sheet [H, W, 3] uint8: kept crops first (in image order), then rejections."""
    ordered = [r for r in records if r.status == 'kept'] + [r for r in records if r.status != 'kept']
    rows = max(1, (len(ordered) + COLUMNS - 1) // COLUMNS)
    columns = min(COLUMNS, max(1, len(ordered)))
    sheet = PIL.Image.new('RGB', (columns * TILE, rows * (TILE + CAPTION)), (255, 255, 255))
    for i, record in enumerate(ordered):
        sheet.paste(_tile(record), ((i % COLUMNS) * TILE, (i // COLUMNS) * (TILE + CAPTION)))
    return np.asarray(sheet)
