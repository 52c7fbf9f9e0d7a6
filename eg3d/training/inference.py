"""Shared pieces of the after-training scripts (projector, PTI, samples, videos, alpha-space, editing, evaluation).

    network pkl (+ adapter files) --load_generator--> G (eval, frozen, on device)
    dataset folder --read_labels / latents_in_folder--> cameras [25] and latents [1, num_ws, w_dim]
    G, ws, cameras --render / render_views--> images [N, 3, H, W] in [-1, 1]
    images --psnr / ssim / build_lpips--> metrics

Every check on user input raises `InputError` with a message that says what to do; the scripts
turn it into a click error (`user_errors`) before any long work starts.
"""

import contextlib
import functools
import math
import os
import re
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import click
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

import dnnlib

from camera_utils import FFHQ_RADIUS, SAMPLING_FOV_DEG
from training import dataset_files
from training.dataset import IMAGE_EXTENSIONS, REVIEW_IMAGES
from training.dataset_files import LATENT_SUFFIX
from training.loss import LPIPS_CHOICES  # re-exported for the scripts' --lpips option

PathLike = Union[str, os.PathLike]
DEFAULT_FOV_DEG = SAMPLING_FOV_DEG  # the official sampling scripts' FFHQ camera: normalised focal length ~4.26


class InputError(ValueError):
    """A problem with what the user passed (missing file, wrong shape, mismatched model)."""


def user_errors(fn):
    """Decorator for click commands: `InputError` becomes a clean `Error: ...` message and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            raise click.ClickException(str(e)) from e
    return wrapper


def _stack_options(fn, options):
    for option in reversed(options):
        fn = option(fn)
    return fn


def network_options(fn):
    """--network, --adapter (repeatable), --device: the model every script renders with."""
    return _stack_options(fn, [
        click.option('--network', 'network_pkl', required=True, metavar='PKL', help='Base or snapshot pkl'),
        click.option('--adapter', 'adapter_paths', multiple=True, metavar='FILE',
                     help='Adapter file to load onto --network; repeat for several identities on one base'),
        click.option('--device', default='auto', show_default=True, help='auto, cpu, cuda, cuda:1, ...'),
    ])


def sample_options(fn):
    """What to render: --adapter-index, --seeds with --trunc/--trunc-cutoff, --latents, --dataset, --interpolate A B."""
    return _stack_options(fn, [
        click.option('--adapter-index', 'adapter_index', type=int, multiple=True,
                     help='Render only with these loaded adapters (default: every one)'),
        click.option('--seeds', type=str, help='Random seeds, e.g. 0-3,7'),
        click.option('--trunc', 'truncation_psi', type=float, default=0.7, show_default=True,
                     help='Truncation psi (seeds)'),
        click.option('--trunc-cutoff', 'truncation_cutoff', type=int, default=None, help='Truncation cutoff (seeds)'),
        click.option('--latents', type=str, help='Comma-separated latent files (.npy)'),
        click.option('--dataset', type=str, help='Folder: every *_latent.npy in it'),
        click.option('--interpolate', type=str, nargs=2, default=None, help='Two latent files A B: interpolate A -> B'),
    ])


def view_options(fn):
    """Camera sweep of the multi-view renders: --num-views, --yaw-range, --pitch, --fov, --nrr, --render-seed."""
    return _stack_options(fn, [
        click.option('--num-views', type=int, default=5, show_default=True, help='Views per sample'),
        click.option('--yaw-range', type=float, default=0.4, show_default=True,
                     help='Views spread over yaw in [-r, r] (radians)'),
        click.option('--pitch', type=float, default=0.0, show_default=True, help='Pitch offset (radians)'),
        click.option('--fov', 'fov_deg', type=float, default=DEFAULT_FOV_DEG, show_default=True,
                     help='Field of view (degrees)'),
        click.option('--nrr', 'neural_rendering_resolution', type=int, default=None,
                     help='Neural rendering resolution (default: the generator\'s)'),
        click.option('--render-seed', type=int, default=0, show_default=True,
                     help='Seed of the renderer\'s depth jitter'),
    ])


# ----------------------------------------------------------------------------------------------
# Small parsing helpers shared by the CLIs.

def parse_range(s: Union[str, Sequence[int], None]) -> List[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    if s is None or s == '':
        return []
    if isinstance(s, (list, tuple)):
        return [int(x) for x in s]
    out = []
    for part in str(s).split(','):
        m = re.fullmatch(r'\s*(-?\d+)\s*-\s*(-?\d+)\s*', part)
        if m:
            out.extend(range(int(m.group(1)), int(m.group(2)) + 1))
        elif part.strip():
            try:
                out.append(int(part))
            except ValueError:
                raise InputError(f'cannot read {s!r} as integers and ranges (e.g. 0-3,7)') from None
    return out


def parse_floats(s: Union[str, Sequence[float], None]) -> List[float]:
    """'-1,0,1.5' -> [-1.0, 0.0, 1.5]."""
    if s is None or s == '':
        return []
    if isinstance(s, (list, tuple)):
        return [float(x) for x in s]
    try:
        return [float(x) for x in str(s).split(',') if x.strip()]
    except ValueError:
        raise InputError(f'cannot read {s!r} as comma-separated numbers (e.g. -1,0,1.5)') from None


def resolve_device(device: str = 'auto') -> torch.device:
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InputError(f'--device={device} is not a device (use auto, cpu, cuda or cuda:N): {e}') from e
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise InputError(f'--device={device} asked for, but CUDA is not available here; use --device=cpu')
    return dev


@contextlib.contextmanager
def seeded(seed: Optional[int], device: Optional[torch.device] = None) -> Iterator[None]:
    """Run a block with the global RNGs seeded (the renderer's depth jitter draws from them) and restore them after."""
    if seed is None:
        yield
        return
    devices = [device] if device is not None and torch.device(device).type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def check_file(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f'{what} not found: {p}')
    return p


def atomic_write(path: PathLike, write_fn, overwrite: bool = True) -> Path:
    """Write through a temp file in the same folder, then rename: readers never see a half-written file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f'{path} exists; pass --overwrite to replace it')
    with dnnlib.util.atomic_write_path(path) as tmp:
        write_fn(tmp)
    return path


# ----------------------------------------------------------------------------------------------
# Networks and adapters.

def load_network_dict(network: PathLike) -> dict:
    """The snapshot dict of a network pkl, read by the safe loader (no code from the file runs)."""
    import legacy
    path = check_file(network, 'Network pickle')
    try:
        with open(path, 'rb') as f:
            return legacy.load_network_pkl(f)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f'could not load network pickle {path}: {e}') from e


def load_generator(network: PathLike, adapter_paths: Sequence[PathLike] = (), device: Union[str, torch.device] = 'cpu',
                   key: str = 'G_ema') -> torch.nn.Module:
    """Generator of a snapshot/base pkl (`G_ema`, else `G`), optionally with adapter file(s) loaded onto it.

    Returned in eval mode with every parameter frozen. Several adapter files put one adapter each on
    the same base (multi-identity); `select_adapter(G, i)` picks which one renders.
    """
    for p in adapter_paths:
        check_file(p, 'Adapter file')
    data = load_network_dict(network)
    G = data.get(key)
    if G is None:
        G = data.get('G')
    if G is None:
        raise InputError(f'{network} holds no generator (keys: {sorted(data)}); pass a snapshot or base pkl')
    G = G.eval().requires_grad_(False)
    if adapter_paths:
        attach_adapters(G, adapter_paths, base_name=str(network))
    return G.to(device)


def attach_adapters(G: torch.nn.Module, adapter_paths: Sequence[PathLike], base_name: str = 'the base') -> None:
    """Load adapter file(s) onto G in place (adapter i into slot i); clear errors for a missing file, a file
    made for another base, or adapters that cannot share one base."""
    from training import adapters
    paths = [check_file(p, 'Adapter file') for p in adapter_paths]
    try:
        if len(paths) > 1:
            if adapters.is_injected(G):
                raise InputError(f'{base_name} already carries adapters; to load several adapters (one per '
                                 'identity) pass the plain base pkl as --network')
            configs = [adapters.read_config(str(p)) for p in paths]
            for p, cfg in zip(paths[1:], configs[1:]):
                if cfg.to_dict() != configs[0].to_dict():
                    raise InputError(f'adapters {paths[0]} and {p} have different configs; several adapters on '
                                     'one base must share rank, targets and factorization')
            adapters.inject(G, configs[0], num_adapters=len(paths))
        for index, p in enumerate(paths):
            adapters.load(G, str(p), index=index)
    except InputError:
        raise
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise InputError(f'adapter does not fit {base_name}: {e}') from e
    G.eval().requires_grad_(False)


def num_adapters(G: torch.nn.Module) -> int:
    """How many adapters G carries (0 for a plain generator)."""
    from training import adapters
    from training.adapters.inject import num_adapters as adapter_count
    return adapter_count(G) if adapters.is_injected(G) else 0


def select_adapter(G: torch.nn.Module, index: int) -> None:
    """Make adapter `index` render every sample (index 0 on a plain generator is a no-op)."""
    from training import adapters
    if index == 0 and not adapters.is_injected(G):
        return
    n = num_adapters(G)
    if not 0 <= index < n:
        raise InputError(f'adapter index {index} asked for, but the generator carries {n} adapter(s)')
    adapters.select(G, index)


def num_ws(G: torch.nn.Module) -> int:
    return int(G.backbone.mapping.num_ws)


# ----------------------------------------------------------------------------------------------
# Cameras.

def camera_label(G: torch.nn.Module, yaw: float = 0.0, pitch: float = 0.0, fov_deg: float = DEFAULT_FOV_DEG,
                 device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Label [1, 25] of a camera on G's average orbit (radius, pivot from rendering_kwargs), yaw/pitch in radians
    relative to the frontal view, as EG3D's LookAtPoseSampler at (pi/2 + yaw, pi/2 + pitch): yaw > 0 puts the camera
    at world +x (the face's left), pitch > 0 BELOW the face (world -y). `camera_utils.label_from_yaw_pitch`, used by
    photo preparation, has pitch > 0 above it and looks at the origin."""
    from camera_utils import FOV_to_intrinsics, LookAtPoseSampler
    device = device if device is not None else next(G.parameters()).device
    rk = G.rendering_kwargs
    pivot = torch.tensor(rk.get('avg_camera_pivot', [0, 0, 0]), dtype=torch.float32)
    radius = float(rk.get('avg_camera_radius', FFHQ_RADIUS))
    with torch.random.fork_rng(devices=[]):  # the sampler draws (zero-scaled) noise; keep callers' streams intact
        cam2world = LookAtPoseSampler.sample(math.pi / 2 + yaw, math.pi / 2 + pitch, pivot, radius=radius)
    intrinsics = FOV_to_intrinsics(fov_deg)
    return torch.cat([cam2world.reshape(-1, 16), intrinsics.reshape(-1, 9)], dim=1).to(device)


def orbit_labels(G: torch.nn.Module, yaws: Sequence[float], pitch: float = 0.0, fov_deg: float = DEFAULT_FOV_DEG,
                 device=None) -> torch.Tensor:
    """Labels [len(yaws), 25] for a horizontal sweep."""
    return torch.cat([camera_label(G, yaw=y, pitch=pitch, fov_deg=fov_deg, device=device) for y in yaws])


def read_labels(folder: PathLike) -> Dict[str, np.ndarray]:
    """{file name: camera [25] float32} from `<folder>/dataset.json` (`labels`: [[name, 25 floats], ...])."""
    path = Path(folder) / dataset_files.LABELS_FILE
    if not path.is_file():
        raise InputError(f'no dataset.json in {folder}: camera labels are needed (or pass --c=<npy>)')
    try:
        labels, problems = dataset_files.parse_labels(path.read_bytes())
    except dataset_files.FileProblem as err:
        raise InputError(f'{path} {err.message}') from None
    if problems:
        raise InputError(f'{path} has {len(problems)} problem(s): ' + '; '.join(f'{f}: {m}' for f, m in problems))
    return labels  # callers name each image without a label


def label_for_image(image_path: PathLike, c_path: Optional[PathLike] = None) -> np.ndarray:
    """Camera [25] of an image: from `c_path` (.npy) if given, else from the dataset.json beside the image."""
    if c_path is not None:
        c = np.load(check_file(c_path, 'Camera file')).astype(np.float32).reshape(-1)
        if c.shape != (25,):
            raise InputError(f'{c_path} holds {c.size} numbers; a camera label is 25 (cam2world 4x4 + intrinsics 3x3)')
        return c
    image_path = Path(image_path)
    labels = read_labels(image_path.parent)
    if image_path.name not in labels:
        raise InputError(f'no camera label for {image_path.name} in {image_path.parent / "dataset.json"}; '
                         'add it there or pass --c=<npy>')
    return labels[image_path.name]


# ----------------------------------------------------------------------------------------------
# Images.

def load_image(path: PathLike, resolution: Optional[int] = None) -> torch.Tensor:
    """Image file -> [1, 3, R, R] float in [-1, 1]; square images are resized to `resolution` if given."""
    path = check_file(path, 'Image')
    try:
        img = PIL.Image.open(path).convert('RGB')
    except (OSError, ValueError) as e:
        raise InputError(f'{path} is not a readable image: {e}') from e
    if img.width != img.height:
        raise InputError(f'{path} is {img.width}x{img.height}; an aligned, square face crop is expected')
    if resolution is not None and img.width != resolution:
        img = img.resize((resolution, resolution), PIL.Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] or [3, H, W] in [-1, 1] -> uint8 [N, H, W, 3] / [H, W, 3]."""
    x = (images.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy() if x.ndim == 4 else x.permute(1, 2, 0).numpy()


def image_grid(rows: Sequence[torch.Tensor], pad: int = 0) -> np.ndarray:
    """Rows of images ([N_i, 3, H, W] each, same H, W) -> one uint8 [H_total, W_total, 3] grid, short rows padded."""
    rows = [to_uint8(r if r.ndim == 4 else r.unsqueeze(0)) for r in rows]
    h, w = rows[0].shape[1:3]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            if img.shape[:2] != (h, w):
                img = np.asarray(PIL.Image.fromarray(img).resize((w, h), PIL.Image.LANCZOS))
            grid[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = img
    return grid


def save_image(image: Union[np.ndarray, torch.Tensor], path: PathLike) -> Path:
    """Save a uint8 [H, W, 3] array or a [3, H, W] / [1, 3, H, W] tensor in [-1, 1] as PNG (atomically)."""
    if isinstance(image, torch.Tensor):
        image = to_uint8(image[0] if image.ndim == 4 else image)
    return atomic_write(path, lambda tmp: PIL.Image.fromarray(image).save(tmp, format='PNG'))


def list_images(folder: PathLike) -> List[Path]:
    return sorted(p for p in Path(folder).iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and p.name not in REVIEW_IMAGES)


# ----------------------------------------------------------------------------------------------
# Latents (dataset format: `image_N_latent.npy` beside `image_N.png`, shape [1, num_ws, w_dim] or [1, w_dim]).

def latent_path_for(image_path: PathLike, folder: Optional[PathLike] = None) -> Path:
    image_path = Path(image_path)
    return Path(folder or image_path.parent) / f'{image_path.stem}{LATENT_SUFFIX}'


def load_latent(path: PathLike, G: torch.nn.Module) -> torch.Tensor:
    """Latent file -> W+ tensor [1, num_ws, w_dim]. Accepts the dataset shapes: W ([w_dim] or [1, w_dim],
    repeated over the layers) and W+ ([num_ws, w_dim] or [1, num_ws, w_dim])."""
    path = check_file(path, 'Latent file')
    try:
        ws = dataset_files.parse_latent(path.read_bytes(), str(path), num_ws(G), int(G.w_dim))
    except dataset_files.FileProblem as err:
        raise InputError(f'{err} (this generator)') from None
    return torch.from_numpy(ws).unsqueeze(0)


def save_latent(path: PathLike, ws: torch.Tensor, overwrite: bool = False) -> Path:
    """Write ws [1, num_ws, w_dim] as float32 .npy (temp file + rename; refuses to replace unless `overwrite`)."""
    arr = ws.detach().float().cpu().numpy()
    if arr.ndim != 3 or arr.shape[0] != 1:
        raise ValueError(f'latent to save must be [1, num_ws, w_dim], got {list(arr.shape)}')
    return save_npy(path, arr, overwrite=overwrite)


def save_npy(path: PathLike, array: np.ndarray, overwrite: bool = True) -> Path:
    """np.save to exactly `path` (no '.npy' appended), atomically."""
    def write(tmp):
        with open(tmp, 'wb') as f:
            np.save(f, array)
    return atomic_write(path, write, overwrite=overwrite)


def latents_in_folder(folder: PathLike) -> List[Path]:
    if not Path(folder).is_dir():
        raise InputError(f'latent folder not found: {folder}')
    paths = sorted(Path(folder).glob(f'*{LATENT_SUFFIX}'))
    if not paths:
        raise InputError(f'no *{LATENT_SUFFIX} files in {folder}')
    return paths


def collect_latent_paths(spec: Optional[str] = None, folder: Optional[PathLike] = None) -> List[Path]:
    """Latent files from a comma-separated list and/or a folder (every `*_latent.npy` in it)."""
    paths = [Path(s.strip()) for s in (spec or '').split(',') if s.strip()]
    if folder is not None:
        paths += latents_in_folder(folder)
    for p in paths:
        check_file(p, 'Latent file')
    return paths


def latent_name(path: PathLike) -> str:
    name = Path(path).name
    return name[:-len(LATENT_SUFFIX)] if name.endswith(LATENT_SUFFIX) else Path(path).stem


def seed_latents(G: torch.nn.Module, seeds: Iterable[int], truncation_psi: float = 1.0,
                 truncation_cutoff: Optional[int] = None, fov_deg: float = DEFAULT_FOV_DEG) -> torch.Tensor:
    """ws [len(seeds), num_ws, w_dim] from z = randn(seed), mapped with the frontal conditioning camera."""
    device = next(G.parameters()).device
    c = camera_label(G, fov_deg=fov_deg, device=device)
    out = []
    for seed in seeds:
        z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).float().to(device)
        with torch.no_grad():
            out.append(G.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Rendering.

def render(G: torch.nn.Module, ws: torch.Tensor, c: torch.Tensor, neural_rendering_resolution: Optional[int] = None,
           seed: Optional[int] = 0, key: str = 'image') -> torch.Tensor:
    """G.synthesis(ws [N, num_ws, w_dim], c [N, 25]) -> [N, 3, H, W]; `seed` fixes the renderer's depth jitter."""
    with seeded(seed, ws.device):
        return G.synthesis(ws, c, neural_rendering_resolution=neural_rendering_resolution, noise_mode='const')[key]


@torch.no_grad()
def render_views(G: torch.nn.Module, ws: torch.Tensor, cameras: torch.Tensor, neural_rendering_resolution=None,
                 seed: Optional[int] = 0, batch_size: int = 4) -> torch.Tensor:
    """One latent [1, num_ws, w_dim] from every camera [V, 25] -> [V, 3, H, W] (float, on CPU)."""
    out = []
    for i in range(0, len(cameras), batch_size):
        c = cameras[i:i + batch_size]
        out.append(render(G, ws.expand(len(c), -1, -1), c, neural_rendering_resolution, seed=seed).float().cpu())
    return torch.cat(out)


def yaw_sweep(num_views: int, yaw_range: float) -> List[float]:
    """`num_views` yaws evenly spread over [-yaw_range, yaw_range] (radians); one view is the frontal 0."""
    if num_views <= 1:
        return [0.0]
    return [float(x) for x in np.linspace(-yaw_range, yaw_range, num_views)]


# ----------------------------------------------------------------------------------------------
# Metrics. Images are [N, 3, H, W] in [-1, 1]; every metric returns one value per image [N].

def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a.float() - b.float()) / 2).square().flatten(1).mean(1)  # in [0, 1] units
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004): Gaussian window 11, sigma 1.5, on [0, 1] images, mean over channels."""
    x, y = (a.float() + 1) / 2, (b.float() + 1) / 2
    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=torch.float32, device=x.device) - (window - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window).contiguous()

    def blur(t):
        return F.conv2d(t, kernel, groups=x.shape[1])
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def build_lpips(kind: str, device: Union[str, torch.device] = 'cpu') -> Optional[torch.nn.Module]:
    """LPIPS module for --lpips (as train.py: alex|vgg|none|alex-random|vgg-random), or None for 'none'.

    The pretrained backbones come from the torch hub cache; offline and missing, the error says where
    to put the file. '*-random' (random backbone) is for tests only.
    """
    from training import loss
    try:
        return loss.make_lpips(kind, torch.device(device))
    except (loss.LPIPSUnavailable, ValueError) as e:
        raise InputError(str(e)) from e


def lpips_distance(model: Optional[torch.nn.Module], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS [N] for images in [-1, 1], at most 256 px (as the EG3D projector); zeros without a model."""
    from training import loss
    if model is None:
        return torch.zeros(a.shape[0], device=a.device)
    return loss.lpips_distance(model, downsample_256(a), downsample_256(b))


def downsample_256(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] > 256:
        x = F.interpolate(x, size=(256, 256), mode='area')
    return x


# ----------------------------------------------------------------------------------------------
# What to render: latents from seeds, files, folders and interpolations, named for the output files.

def interpolate_latents(a: torch.Tensor, b: torch.Tensor, steps: int) -> List[torch.Tensor]:
    """`steps` latents on the straight line from a to b (both ends included), each [1, num_ws, w_dim]."""
    if steps < 2:
        raise InputError(f'--steps must be at least 2 to interpolate, got {steps}')
    return [torch.lerp(a, b, float(t)) for t in np.linspace(0, 1, steps)]


def gather_latents(G: torch.nn.Module, seeds: Sequence[int] = (), truncation_psi: float = 1.0,
                   truncation_cutoff: Optional[int] = None, latent_paths: Sequence[PathLike] = (),
                   interpolate: Optional[Tuple[PathLike, PathLike]] = None, steps: int = 5,
                   fov_deg: float = DEFAULT_FOV_DEG) -> List[Tuple[str, torch.Tensor]]:
    """[(name, ws [1, num_ws, w_dim])] for every seed, latent file and interpolation step asked for.

    Every latent file is read and shape-checked here, before any rendering.
    """
    device = next(G.parameters()).device
    samples = []
    if seeds:
        ws = seed_latents(G, seeds, truncation_psi, truncation_cutoff, fov_deg)
        samples += [(f'seed{s:04d}', w.unsqueeze(0)) for s, w in zip(seeds, ws)]
    samples += [(latent_name(p), load_latent(p, G).to(device)) for p in latent_paths]
    if interpolate:
        a, b = (load_latent(p, G).to(device) for p in interpolate)
        samples += [(f'interp_{latent_name(interpolate[0])}_{latent_name(interpolate[1])}_{i:03d}', w)
                    for i, w in enumerate(interpolate_latents(a, b, steps))]
    if not samples:
        raise InputError('nothing to render: pass --seeds, --latents, --dataset or --interpolate A B')
    return samples


def adapter_indices(G: torch.nn.Module, requested: Sequence[int] = ()) -> List[int]:
    """Adapters to render with: the requested ones (checked), else every adapter G carries (or [0])."""
    n = max(1, num_adapters(G))
    indices = list(requested) or list(range(n))
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise InputError(f'adapter index {bad[0]} asked for, but the generator carries {n} adapter(s)')
    return indices
