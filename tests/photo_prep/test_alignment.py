"""The camera and crop fit: exact on noise-free geometry, and quad, crop and camera convert into each other."""
import math

import numpy as np
import pytest

import camera_utils
from photo_prep import alignment, crop, template


@pytest.mark.parametrize('yaw', [-60, -35, -10, 0, 20, 45, 60])
@pytest.mark.parametrize('pitch', [-30, 0, 15, 30])
def test_template_seen_by_a_known_camera_is_recovered(yaw, pitch):
    rng = np.random.default_rng(abs(yaw * 100 + pitch))
    similarity = alignment.similarity_from_centre(rng.uniform(200, 800, 2), rng.uniform(150, 900),
                                                  rng.uniform(-0.5, 0.5))
    landmarks = alignment.apply_similarity(similarity, alignment.projected_template(math.radians(yaw),
                                                                                    math.radians(pitch)))
    found_yaw, found_pitch, found_roll, rms = alignment.fit_camera(landmarks)
    assert abs(math.degrees(found_yaw) - yaw) < 0.1 and abs(math.degrees(found_pitch) - pitch) < 0.1
    assert rms < 1e-6


def test_label_of_a_fit_is_the_ffhq_camera_of_its_angles():
    label = camera_utils.label_from_yaw_pitch(0.3, -0.2)
    cam2world, intrinsics = camera_utils.split_label(label)
    assert np.allclose(intrinsics.reshape(-1), camera_utils.FFHQ_INTRINSICS)
    assert np.linalg.norm(cam2world[:3, 3]) == pytest.approx(camera_utils.FFHQ_RADIUS, abs=1e-5)
    pivot = np.asarray(camera_utils.FFHQ_PIVOT)
    to_pivot = (pivot - cam2world[:3, 3]) / np.linalg.norm(pivot - cam2world[:3, 3])
    assert np.allclose(to_pivot, cam2world[:3, 2], atol=1e-6)
    assert abs(cam2world[1, 0]) < 1e-7    # no roll: the camera's x axis is level
    yaw, pitch = camera_utils.yaw_pitch_from_direction(camera_utils.viewing_direction(label))
    assert (yaw, pitch) == pytest.approx((0.3, -0.2), abs=1e-6)


def test_quad_similarity_and_view_convert_back_and_forth():
    similarity = alignment.similarity_from_centre(np.array([310.0, 240.0]), 400.0, 0.4)
    quad = alignment.quad_from_similarity(similarity)
    assert np.allclose(alignment.similarity_from_quad(quad), similarity)
    assert np.linalg.norm(quad[1] - quad[0]) == pytest.approx(400.0)
    label = camera_utils.label_from_yaw_pitch(-0.4, 0.1)
    view = alignment.view_from_quad(quad, label)
    assert np.allclose(view.quad, quad) and np.allclose(view.label, label, atol=1e-6)
    assert view.roll == pytest.approx(0.4) and view.side == pytest.approx(400.0)


def test_crop_pixels_come_from_where_the_similarity_says():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    similarity = alignment.similarity_from_centre(np.array([200.0, 150.0]), 64.0, math.pi / 2)
    out = crop.extract(photo, similarity, size=64)
    # A quarter turn with one photo pixel per crop pixel: crop pixel (i, j) is photo pixel centre S((j+.5, i+.5)/64).
    for i, j in [(0, 0), (10, 50), (63, 63), (31, 7)]:
        x, y = alignment.apply_similarity(similarity, np.array([[(j + 0.5) / 64, (i + 0.5) / 64]]))[0]
        assert np.array_equal(out[i, j], photo[int(math.floor(y)), int(math.floor(x))])


def test_whole_image_crop_is_the_identity_and_border_crops_are_padded():
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(crop.extract(photo, np.array([[64.0, 0, 0], [0, 64.0, 0]]), size=64), photo)
    outside = crop.extract(photo, alignment.similarity_from_centre(np.array([0.0, 0.0]), 64.0, 0.0), size=64)
    assert outside.shape == (64, 64, 3)
    # The far corner lies 32 px beyond the photo: it has faded to the photo's median colour.
    assert np.abs(outside[0, 0].astype(int) - np.median(photo.reshape(-1, 3), axis=0)).max() <= 2


def test_template_is_symmetric():
    mirrored = template.TEMPLATE_MM[template.MIRROR] * np.array([-1, 1, 1])
    assert np.allclose(mirrored, template.TEMPLATE_MM)
