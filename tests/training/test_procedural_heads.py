"""The procedural head family and its sphere-tracing renderer: determinism and EG3D's camera conventions."""

import numpy as np
import pytest
import torch

from camera_utils import FFHQ_PIVOT, label_from_yaw_pitch, project_points
from training import procedural_heads as ph


def labels_at(poses):
    return torch.from_numpy(np.stack([label_from_yaw_pitch(yaw, pitch) for yaw, pitch in poses])).float()


class MarkerScene:
    """One small sphere at `centre`: the renderer must draw it where the label's camera projects it."""

    def __init__(self, centre, radius=0.012):
        self.centre = torch.tensor(centre, dtype=torch.float32)
        self.radius = radius

    def sdf(self, p):
        dist = (p - self.centre).norm(dim=-1) - self.radius
        return dist, torch.zeros_like(dist, dtype=torch.long)

    def albedo(self, p, material):
        return torch.ones(p.shape)


def test_params_are_a_fixed_function_of_the_latent():
    assert torch.equal(ph.params_from_seed(3), ph.params_from_seed(3))
    assert not torch.equal(ph.params_from_seed(3), ph.params_from_seed(4))
    z = torch.zeros([2, 64])
    assert torch.allclose(ph.params_from_latent(z), torch.full([2, ph.NUM_PARAMS], 0.5))
    with pytest.raises(ValueError, match='z_dim'):
        ph.params_from_latent(torch.zeros([2, 4]))


def test_render_is_deterministic_and_in_eg3d_ranges():
    scene = ph.HeadScene(torch.cat([ph.params_from_seed(0), ph.params_from_seed(1)]))
    labels = labels_at([(0.3, 0.1), (-0.2, 0.0)])
    a, b = ph.render(scene, labels, 48), ph.render(scene, labels, 48)
    for key in ('image', 'depth', 'mask'):
        assert torch.equal(a[key], b[key]), key
    assert a['image'].shape == (2, 3, 48, 48) and a['depth'].shape == (2, 1, 48, 48)
    assert a['image'].min() >= -1 and a['image'].max() <= 1
    assert not torch.equal(a['image'][0], a['image'][1])  # two heads, two views


@pytest.mark.parametrize('yaw,pitch', [(0.0, 0.0), (0.5, 0.15), (-0.6, -0.2)])
def test_a_point_lands_where_the_label_projects_it(yaw, pitch):
    point = np.array([0.07, -0.05, 0.15])
    resolution = 64
    out = ph.render(MarkerScene(point), labels_at([(yaw, pitch)]), resolution)
    mask = out['mask'][0, 0].numpy()
    assert mask.sum() > 0
    rows, cols = np.nonzero(mask)
    drawn = np.array([(cols + 0.5).mean(), (rows + 0.5).mean()]) / resolution  # x right, y down
    expected = project_points(label_from_yaw_pitch(yaw, pitch), point[None])[0]
    assert np.abs(drawn - expected).max() < 0.5 / resolution
    # Depth is the distance along the ray, as EG3D's image_depth.
    camera = np.linalg.inv(np.linalg.inv(label_from_yaw_pitch(yaw, pitch)[:16].reshape(4, 4)))[:3, 3]
    centre_depth = out['depth'][0, 0][mask > 0].min().item()
    assert abs(centre_depth - (np.linalg.norm(point - camera) - 0.012)) < 2e-3


def test_frontal_head_faces_the_camera():
    out = ph.render(ph.HeadScene(ph.params_from_seed(5)), labels_at([(0.0, 0.0)]), 64)
    mask = out['mask'][0, 0]
    assert 0.2 < mask.mean() < 0.7  # a head with background around it
    rows, cols = torch.nonzero(mask, as_tuple=True)
    assert abs(cols.float().mean().item() + 0.5 - 32) < 3  # left-right symmetric about the image centre
    # The nearest surface, the nose, lies within a few centimetres of the pivot the FFHQ cameras look at.
    camera_to_pivot = np.linalg.norm(label_from_yaw_pitch(0.0, 0.0)[[3, 7, 11]] - np.array(FFHQ_PIVOT))
    assert abs(out['depth'][0, 0][mask > 0].min().item() - camera_to_pivot) < 0.05


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match='head parameters'):
        ph.HeadScene(torch.zeros([2, 3]))
    with pytest.raises(ValueError, match='camera labels'):
        ph.render(ph.HeadScene(ph.params_from_seed(0)), torch.zeros([1, 16]), 32)
