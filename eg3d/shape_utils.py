"""Geometry export: EG3D density on a cubic grid -> `.mrc` volume (mrcfile) and `.ply` mesh (marching cubes).

    volume = extract_density(G, ws, resolution)    # [R, R, R] raw sigma, axes (z, y, x) as .mrc stores them
    save_mrc('shape.mrc', volume, voxel_size)
    verts, faces = density_to_mesh(volume, level=10, box_size=G.rendering_kwargs['box_warp'])
    save_ply('shape.ply', verts, faces)

The grid spans the tri-plane cube [-box_warp/2, box_warp/2]^3 centred on the world origin. Mesh
vertices are world coordinates (x, y, z). The PLY is written by hand (binary little-endian), so no
mesh library is needed.
"""

import os
from typing import Optional, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from training import inference as inf

DEFAULT_LEVEL = 10.0  # EG3D's iso-level for its raw density (sigma before the renderer's softplus)


def grid_coordinates(resolution: int, box_size: float) -> torch.Tensor:
    """World points [R^3, 3] (x, y, z) of the grid, ordered so that reshaping to [R, R, R] gives axes (z, y, x)."""
    axis = torch.linspace(-box_size / 2, box_size / 2, resolution)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing='ij')
    return torch.stack([x, y, z], dim=-1).reshape(-1, 3)


@torch.no_grad()
def extract_density(G: torch.nn.Module, ws: torch.Tensor, resolution: int, max_batch: int = 1_000_000,
                    progress: bool = True) -> np.ndarray:
    """Raw density of one latent ws [1, num_ws, w_dim] on a resolution^3 grid -> float32 [R, R, R] (z, y, x)."""
    box = float(G.rendering_kwargs.get('box_warp', 1))
    device = ws.device
    coords = grid_coordinates(resolution, box)
    sigma = torch.empty(coords.shape[0])
    starts = range(0, coords.shape[0], max_batch)
    for start in tqdm(starts, desc='density', disable=not progress or len(starts) == 1, leave=False):
        chunk = coords[start:start + max_batch].unsqueeze(0).to(device)
        directions = torch.zeros_like(chunk)
        directions[..., 2] = -1  # the decoder ignores directions; any unit vector does
        out = G.sample_mixed(chunk, directions, ws, noise_mode='const')
        sigma[start:start + chunk.shape[1]] = out['sigma'].reshape(-1).float().cpu()
    return sigma.reshape(resolution, resolution, resolution).numpy()


def save_mrc(path: Union[str, os.PathLike], volume: np.ndarray, voxel_size: float = 1.0) -> None:
    """Float32 volume [Z, Y, X] -> .mrc (readable by ChimeraX and `mrcfile.open`)."""
    import mrcfile

    def write(tmp):
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
            mrc.voxel_size = voxel_size
    inf.atomic_write(path, write)


def density_to_mesh(volume: np.ndarray, level: float = DEFAULT_LEVEL,
                    box_size: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """Marching cubes at `level` -> (vertices [V, 3] float32 world (x, y, z), faces [F, 3] int32).

    The volume is padded by one voxel below `level`, so surfaces that reach the border are closed (by caps
    on the faces of the cube).
    Raises ValueError (with the value range) when `level` does not cross the data.
    """
    from skimage import measure
    lo, hi = float(np.min(volume)), float(np.max(volume))
    if not lo < level < hi:
        raise ValueError(f'iso-level {level} is outside the density range [{lo:.3g}, {hi:.3g}]: no surface; '
                         'pick a level inside it (--shape-level)')
    padded = np.pad(volume.astype(np.float32), 1, constant_values=min(lo, level) - 1)
    verts, faces, _normals, _values = measure.marching_cubes(padded, level=level)
    spacing = box_size / (volume.shape[0] - 1)
    verts_xyz = (verts[:, ::-1] - 1) * spacing - box_size / 2  # (z, y, x) index -> (x, y, z) world
    # Caps that close the surface at the border lie between the border and the padding: put them on the border.
    verts_xyz = np.clip(verts_xyz, -box_size / 2, box_size / 2)
    # No winding change needed: in (x, y, z) the triangles of skimage's 'descent' surface face outward
    # (towards lower density), which tests/test_gen_samples.py checks through the signed volume.
    return verts_xyz.astype(np.float32), np.ascontiguousarray(faces, dtype=np.int32)


def save_ply(path: Union[str, os.PathLike], verts: np.ndarray, faces: np.ndarray,
             comment: Optional[str] = 'EG3D density iso-surface') -> None:
    """Binary little-endian PLY with float x, y, z vertices and triangle faces."""
    header = ['ply', 'format binary_little_endian 1.0']
    if comment:
        header.append(f'comment {comment}')
    header += [f'element vertex {len(verts)}', 'property float x', 'property float y', 'property float z',
               f'element face {len(faces)}', 'property list uchar int vertex_indices', 'end_header']
    face_records = np.empty(len(faces), dtype=[('count', 'u1'), ('indices', '<i4', (3,))])
    face_records['count'] = 3
    face_records['indices'] = faces

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(('\n'.join(header) + '\n').encode('ascii'))
            f.write(np.ascontiguousarray(verts, dtype='<f4').tobytes())
            f.write(face_records.tobytes())
    inf.atomic_write(path, write)


def export_shape(G: torch.nn.Module, ws: torch.Tensor, stem: Union[str, os.PathLike], resolution: int,
                 level: float = DEFAULT_LEVEL, progress: bool = True) -> dict:
    """Write `<stem>.mrc` and, when `level` crosses the density, `<stem>.ply`. Returns what was written."""
    box = float(G.rendering_kwargs.get('box_warp', 1))
    volume = extract_density(G, ws, resolution, progress=progress)
    written = {'mrc': f'{stem}.mrc'}
    save_mrc(written['mrc'], volume, voxel_size=box / (resolution - 1))
    try:
        verts, faces = density_to_mesh(volume, level, box)
    except ValueError as e:
        written['mesh_error'] = str(e)
        return written
    written['ply'] = f'{stem}.ply'
    save_ply(written['ply'], verts, faces)
    return written
