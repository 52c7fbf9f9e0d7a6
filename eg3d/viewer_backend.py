"""What the browser viewer (viewer.py) renders: one base generator, several identities, latents, edits, downloads.

    backend = ViewerBackend(network_pkl, adapter_paths, dataset, direction_paths)
    view = View.from_json({'identity': 'alice', 'source': 'alpha', 'alpha_seed': 3, 'yaw': 0.3, ...})
    base, personalized = backend.render_pair(view)        # uint8 [H, W, 3] each (personalized None without identity)
    backend.video(view), backend.mesh(view)               # mp4 / PLY bytes (gen_videos / shape_utils code)

Identities live in an `AdapterRegistry` on the one base: slot k holds an identity, and one slot is
always left empty, so the same batch renders the base (empty slot) beside the identity. Every problem
with the user's input is an `InputError` whose message names the file; the server shows it in the page.
"""

import dataclasses
import hashlib
import re
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import edit
import gen_videos
import sample_alpha
import shape_utils
from training import adapters
from training import inference as inf
from training.adapters import AdapterRegistry

LATENT_SOURCES = ('dataset', 'alpha', 'seed')
MEAN_LATENT = 'mean'  # the dataset choice that averages every anchor latent


@dataclasses.dataclass(frozen=True)
class View:
    """Everything one picture depends on, as the page sends it."""
    identity: str = ''          # '' = no identity: the base only
    source: str = 'seed'        # dataset | alpha | seed
    latent: str = MEAN_LATENT   # dataset: a latent's name (image_0, ...) or 'mean'
    alpha_seed: int = 0         # alpha: seed of the alpha-space draw
    seed: int = 0               # seed: z = randn(seed) ...
    truncation: float = 0.7     # ... mapped with this truncation psi
    yaw: float = 0.0            # radians from the frontal view
    pitch: float = 0.0
    direction: str = ''         # '' = no edit
    strength: float = 0.0       # ws + strength * direction

    @classmethod
    def from_json(cls, data: dict) -> 'View':
        """Build from the page's JSON; unknown keys and wrong types are InputErrors."""
        if not isinstance(data, dict):
            raise inf.InputError('a view must be a JSON object')
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise inf.InputError(f'unknown view field(s) {unknown}; known: {sorted(fields)}')
        values = {}
        for name, value in data.items():
            kind = fields[name]
            if kind is str and not isinstance(value, str):
                raise inf.InputError(f'view field {name} must be a string, got {value!r}')
            if kind is not str:
                try:
                    value = kind(value)
                except (TypeError, ValueError):
                    raise inf.InputError(f'view field {name} must be a number, got {value!r}') from None
                if not np.isfinite(value):
                    raise inf.InputError(f'view field {name} must be finite, got {value!r}')
            values[name] = value
        view = cls(**values)
        for name in ('seed', 'alpha_seed'):
            if not 0 <= getattr(view, name) < 2 ** 32:
                raise inf.InputError(f'view field {name} must lie in [0, 2^32), got {getattr(view, name)}')
        if view.source not in LATENT_SOURCES:
            raise inf.InputError(f'latent source {view.source!r} unknown; use one of {", ".join(LATENT_SOURCES)}')
        return view


def _natural_key(name: str) -> list:
    """Sort key that puts image_2 before image_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def _unique_name(stem: str, taken: Sequence[str]) -> str:
    name, k = stem, 2
    while name in taken:
        name, k = f'{stem}-{k}', k + 1
    return name


class ViewerBackend:
    """The base generator with its identities, anchor latents and edit directions; thread-safe."""

    def __init__(self, network_pkl: str, adapter_paths: Sequence[str] = (), dataset: Optional[str] = None,
                 direction_paths: Sequence[str] = (), device: str = 'auto', neural_rendering_resolution: Optional[int] = None,
                 fov_deg: float = inf.DEFAULT_FOV_DEG, max_identities: int = 8, anchors_per_sample: int = 3,
                 beta: float = 0.0, video_frames: int = 60, video_fps: int = 24, shape_res: int = 128,
                 shape_level: float = shape_utils.DEFAULT_LEVEL):
        """Loads the network (InputError if it cannot); problems with the other files are collected in
        `self.errors` (the page lists them) and the viewer runs without those files."""
        self.device = inf.resolve_device(device)
        self.network_pkl = str(network_pkl)
        self.G = inf.load_generator(network_pkl, (), self.device)
        if adapters.is_injected(self.G):
            raise inf.InputError(f'{network_pkl} already carries adapters; pass the plain base pkl as --network and the '
                                 'run\'s adapter-*.safetensors file(s) as --adapter')
        self.nrr = neural_rendering_resolution
        self.fov_deg = fov_deg
        self.max_identities = int(max_identities)
        self.anchors_per_sample, self.beta = anchors_per_sample, beta
        self.video_frames, self.video_fps = video_frames, video_fps
        self.shape_res, self.shape_level = shape_res, shape_level
        self.registry = AdapterRegistry(self.G, capacity=self.max_identities + 1)  # + the empty slot of the base
        self.anchors: Dict[str, torch.Tensor] = {}
        self.directions: Dict[str, torch.Tensor] = {}
        self.errors: List[str] = []
        self._lock = threading.Lock()
        self._adapters_version = 0  # bumped whenever adapter weights change: cached planes are then stale
        self._planes_key = None     # what the generator's cached backbone planes were computed from
        for path in adapter_paths:
            self._collect_error(self.add_identity, path)
        if dataset:
            self._collect_error(self._load_anchors, dataset)
        for path in direction_paths:
            self._collect_error(self._load_direction, path)

    def _collect_error(self, fn, *args) -> None:
        try:
            fn(*args)
        except inf.InputError as e:
            self.errors.append(str(e))

    # ------------------------------------------------------------------------------------------
    # Inputs.

    def add_identity(self, path: str) -> str:
        """Load an adapter file as a new identity (named after the file); returns its name."""
        path = inf.check_file(path, 'Adapter file')
        if len(self.registry) >= self.max_identities:
            raise inf.InputError(f'cannot load {path}: {self.max_identities} identities are loaded already '
                                 '(restart with a larger --max-identities)')
        name = _unique_name(path.stem, self.registry.names)
        with self._lock:
            try:
                self._adapters_version += 1
                self.registry.load(name, str(path))
            except (ValueError, TypeError, IndexError, KeyError, OSError) as e:
                message = str(e) if str(path) in str(e) else f'{path}: {e}'
                raise inf.InputError(f'adapter does not fit {self.network_pkl}: {message}') from e
        return name

    def _load_anchors(self, dataset: str) -> None:
        """The dataset latents, in sample_alpha.py's order (so that an alpha seed draws the same sample there)."""
        for path in inf.latents_in_folder(dataset):
            self.anchors[inf.latent_name(path)] = inf.load_latent(path, self.G).to(self.device)

    def _load_direction(self, path: str) -> None:
        try:
            direction = inf.load_latent(path, self.G)
        except inf.InputError as e:
            raise inf.InputError(f'direction: {e}') from e
        self.directions[_unique_name(Path(path).stem, list(self.directions))] = direction.to(self.device)

    def info(self) -> dict:
        """What the page needs to build its controls."""
        return dict(network=self.network_pkl, identities=self.registry.names,
                    latents=([MEAN_LATENT] + sorted(self.anchors, key=_natural_key)) if self.anchors else [],
                    directions=list(self.directions), errors=list(self.errors), device=str(self.device),
                    resolution=int(self.G.img_resolution), max_identities=self.max_identities)

    # ------------------------------------------------------------------------------------------
    # Latents.

    def _anchor_stack(self) -> torch.Tensor:
        if not self.anchors:
            raise inf.InputError('no dataset latents: start the viewer with --dataset=<identity folder> '
                                 '(its *_latent.npy files), or use a seed')
        return torch.cat(list(self.anchors.values()))

    def _latent(self, view: View) -> torch.Tensor:
        """ws [1, num_ws, w_dim] of the view, with the generator's current adapter selection (seeds go through
        the mapping network, which an adapter may change)."""
        if view.source == 'seed':
            return inf.seed_latents(self.G, [view.seed], view.truncation, fov_deg=self.fov_deg)
        anchors = self._anchor_stack()
        if view.source == 'alpha':
            weights = sample_alpha.sample_alpha_weights(len(anchors), 1, self.anchors_per_sample, self.beta,
                                                        seed=view.alpha_seed)
            return sample_alpha.combine(anchors, weights)
        if view.latent == MEAN_LATENT:
            return anchors.mean(dim=0, keepdim=True)
        if view.latent not in self.anchors:
            raise inf.InputError(f'no dataset latent named {view.latent!r} (have: {", ".join(self.anchors)})')
        return self.anchors[view.latent]

    def _edited(self, ws: torch.Tensor, view: View) -> torch.Tensor:
        if not view.direction:
            return ws
        if view.direction not in self.directions:
            raise inf.InputError(f'no edit direction named {view.direction!r} (have: {", ".join(self.directions) or "none"})')
        return edit.apply_edit(ws, self.directions[view.direction], view.strength)

    def _slots(self, identity: str) -> Tuple[int, Optional[int]]:
        """(slot of the base, slot of the identity or None); the base slot is an empty one."""
        used = {self.registry.slot(n) for n in self.registry.names}
        base_slot = min(set(range(self.registry.capacity)) - used)  # never full: add_identity keeps one free
        if not identity:
            return base_slot, None
        if identity not in self.registry:
            raise inf.InputError(f'no identity named {identity!r} (loaded: {", ".join(self.registry.names) or "none"})')
        return base_slot, self.registry.slot(identity)

    def _select(self, slot) -> None:
        if adapters.is_injected(self.G):
            adapters.select(self.G, slot)

    def _latent_with(self, slot: int, view: View) -> torch.Tensor:
        self._select(slot)
        return self._edited(self._latent(view), view)

    # ------------------------------------------------------------------------------------------
    # Renders and downloads.

    @torch.no_grad()
    def render_pair(self, view: View) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(base image, personalized image or None) as uint8 [H, W, 3], rendered in one batch.

        The tri-plane backbone does not depend on the camera: when only the pose changed since the last
        render, its planes are reused (EG3D's `use_cached_backbone`), so orbiting costs the ray marching only.
        """
        with self._lock:
            base_slot, identity_slot = self._slots(view.identity)
            slots = [base_slot] if identity_slot is None else [base_slot, identity_slot]
            ws = torch.cat([self._latent_with(s, view) for s in slots])
            self._select(torch.tensor(slots))
            c = inf.camera_label(self.G, view.yaw, view.pitch, self.fov_deg, self.device).expand(len(slots), -1)
            key = (tuple(slots), self._adapters_version, hashlib.sha1(ws.cpu().numpy().tobytes()).hexdigest())
            with inf.seeded(0, self.device):  # the renderer's depth jitter: the same view gives the same pixels
                out = self.G.synthesis(ws, c, neural_rendering_resolution=self.nrr, noise_mode='const',
                                       cache_backbone=True, use_cached_backbone=key == self._planes_key)
            self._planes_key = key
            images = inf.to_uint8(out['image'])
        return images[0], (images[1] if identity_slot is not None else None)

    def image(self, view: View) -> np.ndarray:
        """The personalized image of the view (the base's without an identity)."""
        base, personalized = self.render_pair(view)
        return base if personalized is None else personalized

    def _shown_slot(self, view: View) -> int:
        base_slot, identity_slot = self._slots(view.identity)
        return base_slot if identity_slot is None else identity_slot

    def latent(self, view: View) -> torch.Tensor:
        """ws [1, num_ws, w_dim] of the view's personalized face (the base's without an identity), edit included."""
        with self._lock:
            return self._latent_with(self._shown_slot(view), view)

    def video(self, view: View) -> bytes:
        """mp4 of one orbit around the view's (personalized) face: gen_videos' orbit and writer."""
        with self._lock, tempfile.TemporaryDirectory() as tmp:
            ws = self._latent_with(self._shown_slot(view), view)
            angles = gen_videos.orbit_angles(self.video_frames, yaw_range=0.35, pitch_range=0.25)
            path = Path(tmp) / 'orbit.mp4'
            gen_videos.write_video(path, self.G, [ws], angles, self.video_fps, self.fov_deg, self.nrr,
                                   render_seed=0, desc='orbit video')
            return path.read_bytes()

    def mesh(self, view: View) -> bytes:
        """Binary PLY of the view's (personalized) face: shape_utils' density grid and marching cubes."""
        with self._lock, tempfile.TemporaryDirectory() as tmp:
            ws = self._latent_with(self._shown_slot(view), view)
            written = shape_utils.export_shape(self.G, ws, Path(tmp) / 'shape', self.shape_res, self.shape_level,
                                               progress=False)
            if 'ply' not in written:
                raise inf.InputError(f'no mesh for this face: {written["mesh_error"]}')
            return Path(written['ply']).read_bytes()
