"""End-to-end demo on CPU: personalize a small EG3D that renders 3D heads to one person with rank-1 LoRA adapters.

    make demo                         # or: .venv/bin/python eg3d/demo.py

    1. base      networks/demo-heads.pkl (committed): a tiny EG3D that eg3d/make_demo_base.py trained to
                 render a procedural family of 3D heads (training/procedural_heads.py); loaded with the safe
                 loader, never retrained here
    2. person    a head outside that family (a longer nose, thicker hair and redder skin than any latent
                 gives), drawn by the family's exact renderer in the real dataset format: datasets/demo/
                 (training selfies), datasets/demo-heldout/ (views kept out of training) and
                 datasets/demo-groundtruth/ (a manifest with the person's parameters)
    3. train     eg3d/train.py --lora=1 on the selfies, as a researcher would run it
    4. evaluate  held-out views against the exact renderer: PSNR, LPIPS and depth error of the base and
                 the personalized model; an image grid (rows ground truth | base | personalized, then the
                 three depth maps) and an orbit video with the same three panels

Step 2 is reused when its files are already there and match (re-running only trains and evaluates
again, in a new run directory). See docs/demo.md.
"""

import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
import torch.nn.functional as F

import legacy
from training import adapters
from training import inference as inf
from training import loss as loss_module
from training import procedural_heads as ph
from training import synthetic_identity as si
from training.adapters.inject import adapter_layers, base_name
from training.recipe import DEFAULT_RECIPE, RECIPES, step_batch

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = 'manifest.json'
BASE_FAMILY = 'training.procedural_heads'  # the `family` a demo base pickle records (make_demo_base.py)
NEURAL_RENDERING_RESOLUTION = 32  # the tiny base renders 32x32 features, superresolved to 128x128
EVAL_SEED = 100_000  # renderer jitter of the evaluation renders, unlike any training render
# The person: the family's head of this seed, with features pushed outside the family's [0, 1] range.
PERSON_ANCHOR_SEED = 1  # light skin, brown hair, no glasses
PERSON_FEATURES = {'nose_length': 1.8, 'hair_thickness': 2.0, 'skin_redness': 3.0}
DEPTH_NEAR, DEPTH_FAR = 2.45, 2.95  # depth maps are drawn white (near) to black (far) over this range
RENDER_BATCH = 8  # views per call of the exact renderer (bounds its memory)


@dataclass(frozen=True)
class Recipe:
    """Everything the demo identity is a function of; a change means the files are rebuilt."""
    seed: int
    views: int
    heldout: int
    version: int = 2  # bump when the generation code changes what it writes


@dataclass(frozen=True)
class DemoPaths:
    base_pkl: Path
    data: Path
    heldout: Path
    groundtruth: Path
    outdir: Path

    @staticmethod
    def from_options(base_pkl: str, data: str, outdir: str) -> 'DemoPaths':
        data_path = Path(data).absolute()
        return DemoPaths(base_pkl=Path(base_pkl).absolute(), data=data_path,
                         heldout=data_path.with_name(data_path.name + '-heldout'),
                         groundtruth=data_path.with_name(data_path.name + '-groundtruth'),
                         outdir=Path(outdir).absolute())


class DemoError(click.ClickException):
    """A problem the user can fix (a file in the way, a failed step); printed as `Error: ...`."""


def say(msg: str) -> None:
    print(msg, flush=True)


def shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter to read)."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)

#----------------------------------------------------------------------------
# Cameras.


def training_poses(num_views: int, seed: int) -> List[Tuple[float, float]]:
    """(yaw, pitch) in radians spread like FFHQ: mostly near-frontal, a tail of profile views.

    yaw ~ N(0, 0.3) clipped to +-0.8, pitch ~ N(0, 0.12) clipped to +-0.35.
    """
    rnd = np.random.RandomState(seed)
    yaws = np.clip(rnd.normal(0, 0.3, num_views), -0.8, 0.8)
    pitches = np.clip(rnd.normal(0, 0.12, num_views), -0.35, 0.35)
    return [(float(y), float(p)) for y, p in zip(yaws, pitches)]


def heldout_poses(num_views: int) -> List[Tuple[float, float]]:
    """A yaw sweep over [-0.6, 0.6] at pitches alternating +-0.08: disjoint from the random training poses."""
    yaws = np.linspace(-0.6, 0.6, num_views) if num_views > 1 else np.zeros(1)
    return [(float(y), 0.08 * (-1) ** i) for i, y in enumerate(yaws)]


def camera_labels(G: torch.nn.Module, poses: Sequence[Tuple[float, float]]) -> np.ndarray:
    """EG3D labels [N, 25] on G's average orbit (radius, pivot) with the FFHQ intrinsics."""
    labels = [inf.camera_label(G, yaw=yaw, pitch=pitch, device='cpu')[0] for yaw, pitch in poses]
    return torch.stack(labels).numpy().astype(np.float32)

#----------------------------------------------------------------------------
# Step 1: the base generator.


def load_base(path: Path) -> Tuple[torch.nn.Module, dict]:
    """The demo base generator at `path` and its `demo_base` record (how it was trained and how well it renders).

    Read by the safe loader; a missing file, or a pickle not trained on the head family, is a clear error.
    """
    if not path.is_file():
        raise DemoError(f'{path} does not exist. The demo base networks/demo-heads.pkl is tracked in git '
                        '(`git checkout networks/demo-heads.pkl`); eg3d/make_demo_base.py rebuilds it')
    try:
        data = legacy.load_network_pkl(str(path))
    except Exception as err:
        raise DemoError(f'{path} cannot be read as a network pickle ({err})') from err
    info = data.get('demo_base')
    if not isinstance(info, dict) or info.get('family') != BASE_FAMILY:
        raise DemoError(f'{path} is not a demo base trained on the head family ({BASE_FAMILY}, by '
                        'eg3d/make_demo_base.py); pass --base=networks/demo-heads.pkl')
    return data['G_ema'].eval().requires_grad_(False), info

#----------------------------------------------------------------------------
# Step 2: the person, rendered by the exact renderer.


def groundtruth_adapter(G_base: torch.nn.Module, G_person: torch.nn.Module, rank: int) -> torch.nn.Module:
    """A copy of G_base with rank-`rank` LoRA adapters that turn it into G_person exactly.

    G_person differs from G_base by a rank-`rank` change of conv weights; the top singular triplets
    of each difference, reshaped [out, in*k*k], are the adapter's factors (B = U S, A = V^T).
    (The demo's person is now a rendered head; bench/viewer.py and the viewer tests still build
    synthetic people this way.)
    """
    cfg = adapters.AdapterConfig(r=rank, alpha=float(rank), targets=('synthesis', 'superresolution'),
                                 conv_factorization='standard')
    G = adapters.inject(copy.deepcopy(G_base), cfg)
    person = dict(G_person.named_parameters())
    base = dict(G_base.named_parameters())
    covered = set()
    with torch.no_grad():
        for name, layer in adapter_layers(G):
            key = base_name(name) + '.weight'
            delta = (person[key] - base[key]).reshape(layer.fan_out, layer.fan_in)
            covered.add(key)
            U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
            layer.lora_B[0].copy_((U[:, :rank] * S[:rank]).float())
            layer.lora_A[0].copy_(Vh[:rank].float())
            approx = layer.delta_weight(0).reshape(delta.shape)
            if (approx - delta).norm() > 1e-4 * max(float(delta.norm()), 1.0):
                raise RuntimeError(f'ground truth change of {key} is not of rank {rank}')
    changed = [n for n in base if n not in covered and not torch.equal(base[n], person[n])]
    if changed:
        raise RuntimeError(f'ground truth changes parameters no adapter covers: {changed[:3]}')
    return G


def person_params() -> torch.Tensor:
    """Head parameters [1, NUM_PARAMS] of the person: the anchor head with PERSON_FEATURES (outside [0, 1])."""
    params = ph.params_from_seed(PERSON_ANCHOR_SEED).clone()
    for name, value in PERSON_FEATURES.items():
        params[0, ph.PARAM_NAMES.index(name)] = value
    return params


def person_latent(G: torch.nn.Module) -> torch.Tensor:
    """W+ latent [1, num_ws, w_dim] of the anchor head: the family's nearest head, where personalizing starts."""
    z = ph.latent_from_seed(PERSON_ANCHOR_SEED, G.z_dim)
    with torch.no_grad():
        return G.mapping(z, torch.zeros([1, G.c_dim]))  # psi 1, as make_demo_base.py trains the base


def render_person(params: torch.Tensor, cameras: torch.Tensor, resolution: int) -> Dict[str, torch.Tensor]:
    """The exact renderer's image, depth and mask of the head `params` [1, P] from every camera [V, 25]."""
    parts = [ph.render(ph.HeadScene(params.expand(len(c), -1)), c, resolution)
             for c in torch.split(cameras.float(), RENDER_BATCH)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(paths: DemoPaths) -> Optional[dict]:
    try:
        return json.loads((paths.groundtruth / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def base_fingerprint(G_base: torch.nn.Module) -> Dict[str, str]:
    """sha256 of the base's weights: the identity's latents are a function of them."""
    return {'base_weights_sha256': adapters.fingerprint(G_base)['weights_sha256']}


def identity_is_valid(paths: DemoPaths, recipe: Recipe, fingerprints: Dict[str, str],
                      G_base: torch.nn.Module) -> Tuple[bool, str]:
    """Whether the three folders hold exactly what `recipe` on this base would write (and why not)."""
    from training.dataset import DatasetError, read_identity
    manifest = read_manifest(paths)
    if manifest is None:
        return False, 'no manifest'
    if manifest.get('recipe') != asdict(recipe) or manifest.get('fingerprints') != fingerprints:
        return False, 'made with other settings or another base'
    if manifest.get('person', {}).get('params') != person_params()[0].tolist():
        return False, 'made for another person'
    for folder, key in ((paths.data, 'train'), (paths.heldout, 'heldout')):
        labels = folder / 'dataset.json'
        if not labels.is_file() or _sha256(labels) != manifest['dataset_json_sha256'].get(key):
            return False, f'{shown(labels)} is missing or changed'
        try:
            read_identity(str(folder), resolution=G_base.img_resolution, num_ws=G_base.backbone.num_ws,
                          w_dim=G_base.w_dim)
        except DatasetError as err:
            return False, str(err)
    return True, ''


def check_identity_folders_are_ours(paths: DemoPaths) -> None:
    """Refuse to replace non-empty folders that the demo did not write (no manifest): they may be user data."""
    if read_manifest(paths) is not None:
        return
    for folder in (paths.data, paths.heldout, paths.groundtruth):
        if folder.exists() and any(folder.iterdir()):
            raise DemoError(f'{folder} exists and was not written by the demo (no {paths.groundtruth / MANIFEST}); '
                            'move it away or pass --data=<other folder>')


def _swap_in(new: Path, target: Path) -> None:
    """Put the finished folder `new` at `target`, replacing what is there only once `new` is complete."""
    old = None
    if target.exists():
        old = target.with_name(f'.{target.name}.old-{os.getpid()}')
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old)


def prepare_identity(paths: DemoPaths, recipe: Recipe, G_base: torch.nn.Module) -> None:
    """Write the training selfies, held-out views and manifest, unless valid ones are already there."""
    fingerprints = base_fingerprint(G_base)
    valid, why = identity_is_valid(paths, recipe, fingerprints, G_base)
    if valid:
        say(f'    reusing {shown(paths.data)} ({recipe.views} views), {shown(paths.heldout)} ({recipe.heldout} views), '
            f'{shown(paths.groundtruth)}')
        return
    check_identity_folders_are_ours(paths)
    if read_manifest(paths) is not None:
        say(f'    rebuilding the demo identity: {why}')

    poses = training_poses(recipe.views, recipe.seed + 2) + heldout_poses(recipe.heldout)
    labels = camera_labels(G_base, poses)
    latents = person_latent(G_base).expand(len(poses), -1, -1).numpy()
    params = person_params()
    features = ', '.join(f'{k} {v:g}' for k, v in PERSON_FEATURES.items())
    say(f'    rendering {len(poses)} views of the person (head {PERSON_ANCHOR_SEED} of the family with {features}: '
        'outside its [0, 1] range) with the exact renderer...')
    t0 = time.time()
    images = render_person(params, torch.from_numpy(labels), G_base.img_resolution)['image']
    images = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy()
    say(f'    rendered in {time.time() - t0:.0f} s')

    for folder in (paths.data, paths.heldout, paths.groundtruth):
        folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = {folder: Path(tempfile.mkdtemp(dir=folder.parent, prefix=f'.{folder.name}.tmp-'))
           for folder in (paths.data, paths.heldout, paths.groundtruth)}
    try:
        for t in tmp.values():
            os.chmod(t, 0o755)  # mkdtemp makes private folders; the dataset is not
        v = recipe.views
        si.write_dataset(str(tmp[paths.data]), images[:v], labels[:v], latents[:v])
        si.write_dataset(str(tmp[paths.heldout]), images[v:], labels[v:], latents[v:])
        manifest = dict(
            recipe=asdict(recipe), fingerprints=fingerprints,
            person=dict(anchor_seed=PERSON_ANCHOR_SEED, features=PERSON_FEATURES, param_names=list(ph.PARAM_NAMES),
                        params=params[0].tolist()),
            dataset_json_sha256={'train': _sha256(tmp[paths.data] / 'dataset.json'),
                                 'heldout': _sha256(tmp[paths.heldout] / 'dataset.json')},
            poses_yaw_pitch={'train': poses[:v], 'heldout': poses[v:]},
            about=('The demo person: head `anchor_seed` of the procedural family with `features` outside the '
                   'family\'s range, drawn by training/procedural_heads.py; its latents are the anchor\'s. '
                   'Written by eg3d/demo.py.'))
        (tmp[paths.groundtruth] / MANIFEST).write_text(json.dumps(manifest, indent=2))
        # The ground-truth folder (with the manifest) goes last: an interrupted swap leaves a stale manifest.
        for folder in (paths.data, paths.heldout, paths.groundtruth):
            _swap_in(tmp[folder], folder)
    finally:
        for t in tmp.values():
            shutil.rmtree(t, ignore_errors=True)
    yaws = [p[0] for p in poses[:v]]
    say(f'    wrote {shown(paths.data)}: {v} selfies (image_N.png, image_N_latent.npy W+ [1, {G_base.backbone.num_ws}, '
        f'{G_base.w_dim}], dataset.json), yaw {min(yaws):+.2f}..{max(yaws):+.2f} rad')
    say(f'    wrote {shown(paths.heldout)}: {recipe.heldout} held-out views (yaw sweep -0.6..+0.6 rad)')
    say(f'    wrote {shown(paths.groundtruth)}: {MANIFEST} (the person\'s head parameters; kept out of the dataset)')

#----------------------------------------------------------------------------
# Step 3: training, through the command-line interface a researcher would use.


def run_dirs(outdir: Path) -> set:
    return {p for p in outdir.iterdir() if p.is_dir()} if outdir.is_dir() else set()


def train(paths: DemoPaths, kimg: float, batch: int, lr: float, seed: int) -> Path:
    """Run eg3d/train.py in a subprocess (output streamed); return its new run directory."""
    script = Path(__file__).resolve().parent / 'train.py'
    path_args = [f'--outdir={paths.outdir}', f'--data={paths.data}', f'--resume={paths.base_pkl}']
    shown_args = [f'--outdir={shown(paths.outdir)}', f'--data={shown(paths.data)}', f'--resume={shown(paths.base_pkl)}']
    options = ['--cfg=resume', '--gpus=1', '--device=cpu', f'--batch={batch}', f'--kimg={kimg:g}',
               f'--tick={max(kimg / 8, batch / 1000):g}', '--snap=1000', f'--seed={seed}',
               '--lora=1', '--lora_alpha=1', '--adalora=False', f'--glr={lr:g}',
               '--lpips=none', f'--neural_rendering_resolution_initial={NEURAL_RENDERING_RESOLUTION}',
               '--grid=4', f'--progress={sys.stderr.isatty()}', '--desc=demo']
    say(f'    $ python {shown(script)} ' + ' '.join(shown_args + options))
    cmd = [sys.executable, str(script)] + path_args + options
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    before = run_dirs(paths.outdir)
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
        raise DemoError(f'eg3d/train.py failed (exit code {proc.returncode}); its output is above')
    new = sorted(run_dirs(paths.outdir) - before)
    if len(new) != 1:
        raise DemoError(f'could not find the run directory train.py made in {paths.outdir}')
    return new[0]


def latest_adapter(run_dir: Path) -> Path:
    files = sorted(run_dir.glob('adapter-*.safetensors'))
    if not files:
        raise DemoError(f'{run_dir} holds no adapter-*.safetensors; did training finish?')
    return files[-1]

#----------------------------------------------------------------------------
# Step 4: evaluation on the held-out views, against the exact renderer.


def evaluation_lpips() -> Tuple[torch.nn.Module, str]:
    """Pretrained AlexNet LPIPS when its weights are in the torch hub cache, else a seeded random-backbone LPIPS."""
    if os.path.isfile(loss_module.lpips_backbone_path('alex')):
        return inf.build_lpips('alex'), 'LPIPS (AlexNet, pretrained)'
    with inf.seeded(0):
        model = inf.build_lpips('alex-random')
    return model, 'LPIPS* (random AlexNet backbone: pretrained weights not in the torch hub cache)'


@torch.no_grad()
def render_heldout(G: torch.nn.Module, cameras: torch.Tensor, latents: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Image [V, 3, 128, 128] and depth [V, 1, 32, 32] of every held-out view, renderer jitter seeded per view."""
    outs = []
    for i in range(len(cameras)):
        with inf.seeded(EVAL_SEED + i):
            outs.append(G.synthesis(latents[i:i + 1], cameras[i:i + 1], noise_mode='const',
                                    neural_rendering_resolution=NEURAL_RENDERING_RESOLUTION))
    return dict(image=torch.cat([o['image'] for o in outs]).clamp(-1, 1),
                depth=torch.cat([o['image_depth'] for o in outs]))


def truth_depth(params: torch.Tensor, cameras: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The renderer's depth [V, 1, 32, 32] and the mask of pixels the head covers whole, at the base's 32 px."""
    truth = render_person(params, cameras, 2 * NEURAL_RENDERING_RESOLUTION)
    depth = F.interpolate(truth['depth'], size=NEURAL_RENDERING_RESOLUTION, mode='area')
    mask = F.interpolate(truth['mask'], size=NEURAL_RENDERING_RESOLUTION, mode='area') > 0.999
    return depth, mask


def depth_error(depth: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute depth difference (world units along the ray) on the pixels the head covers."""
    return float((depth - truth).abs()[mask].mean())


def depth_picture(depth: torch.Tensor, size: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depth maps [V, 1, r, r] as grey images [V, 3, size, size] in [-1, 1]: near white, far (and off the mask) black."""
    shade = ((DEPTH_FAR - depth) / (DEPTH_FAR - DEPTH_NEAR)).clamp(0, 1)
    if mask is not None:
        shade = shade * mask
    return F.interpolate(shade, size=size, mode='nearest').expand(-1, 3, -1, -1) * 2 - 1


def labelled_grid(rows: Sequence[Tuple[str, torch.Tensor]], column_titles: Sequence[str]) -> np.ndarray:
    """uint8 grid, one row of images per (label, images [N, 3, H, W]); row labels on the left, titles on top."""
    pad, margin, header = 2, 130, 26
    grid = inf.image_grid([images for _, images in rows], pad=pad)
    size = rows[0][1].shape[-1]
    canvas = PIL.Image.new('RGB', (grid.shape[1] + margin, grid.shape[0] + header), 'white')
    canvas.paste(PIL.Image.fromarray(grid), (margin, header))
    draw = PIL.ImageDraw.Draw(canvas)
    font = PIL.ImageFont.load_default(size=15)
    for i, (label, _) in enumerate(rows):
        draw.text((8, header + i * (size + pad) + size // 2), label, fill='black', font=font, anchor='lm')
    for j, title in enumerate(column_titles):
        draw.text((margin + j * (size + pad) + size // 2, header // 2), title, fill='black', font=font, anchor='mm')
    return np.asarray(canvas)


def write_png(array: np.ndarray, path: Path) -> None:
    inf.atomic_write(path, lambda tmp: PIL.Image.fromarray(array).save(tmp, format='PNG'))


def evaluate(paths: DemoPaths, adapter_path: Path, run_dir: Path) -> dict:
    """Metrics of base and personalized against the renderer's held-out views; writes the grid."""
    from training.dataset import read_identity
    models = {'base': inf.load_generator(paths.base_pkl),
              'personalized': inf.load_generator(paths.base_pkl, [adapter_path])}
    G_base = models['base']
    names, images, cameras, latents = read_identity(str(paths.heldout), resolution=G_base.img_resolution,
                                                    num_ws=G_base.backbone.num_ws, w_dim=G_base.w_dim)
    view_index = [int(Path(name).stem.split('_')[-1]) for name in names]  # image_<i>.png is held-out pose i
    order = np.argsort(view_index)  # read_identity sorts names as text (image_10 before image_2)
    photos = torch.from_numpy(images[order]).float() / 127.5 - 1
    cameras, latents = torch.from_numpy(cameras[order]), torch.from_numpy(latents[order])
    manifest = read_manifest(paths)
    depth_truth, mask = truth_depth(torch.tensor([manifest['person']['params']]), cameras)
    lpips_model, lpips_name = evaluation_lpips()
    renders, metrics = {}, {}
    for name, G in models.items():
        renders[name] = render_heldout(G, cameras, latents)
        metrics[name] = dict(lpips=float(inf.lpips_distance(lpips_model, renders[name]['image'], photos).mean()),
                             psnr=float(inf.psnr(renders[name]['image'], photos).mean()),
                             depth_error=depth_error(renders[name]['depth'], depth_truth, mask))
    size = photos.shape[-1]
    grid_path = run_dir / 'heldout_grid.png'
    rows = [('ground truth', photos), ('base', renders['base']['image']),
            ('personalized', renders['personalized']['image']),
            ('depth: truth', depth_picture(depth_truth, size, mask)),
            ('depth: base', depth_picture(renders['base']['depth'], size)),
            ('depth: personal.', depth_picture(renders['personalized']['depth'], size))]
    poses = manifest['poses_yaw_pitch']['heldout']
    write_png(labelled_grid(rows, [f'yaw {poses[view_index[i]][0]:+.2f}' for i in order]), grid_path)
    table = adapters.parameter_table(models['personalized'])
    return dict(metrics=metrics, lpips_name=lpips_name, grid=grid_path, num_views=len(photos),
                adapter_params=table['adapter_total'], base_params=table['base_total'])


def captioned_frame(panels: Sequence[torch.Tensor], titles: Sequence[str], gap: int = 8, header: int = 32) -> np.ndarray:
    """uint8 [H, W, 3]: images [3, R, R] side by side under their titles (sizes multiples of 16, for the encoder)."""
    size = panels[0].shape[-1]
    canvas = PIL.Image.new('RGB', (len(panels) * size + (len(panels) - 1) * gap, size + header), 'white')
    draw = PIL.ImageDraw.Draw(canvas)
    font = PIL.ImageFont.load_default(size=15)
    for j, (panel, title) in enumerate(zip(panels, titles)):
        canvas.paste(PIL.Image.fromarray(inf.to_uint8(panel)), (j * (size + gap), header))
        draw.text((j * (size + gap) + size // 2, header // 2), title, fill='black', font=font, anchor='mm')
    return np.asarray(canvas)


def write_orbit(paths: DemoPaths, adapter_path: Path, path: Path, frames: int, fps: int) -> None:
    """Orbit video (yaw +-0.6, pitch +-0.15 rad): ground truth | base | personalized, side by side."""
    import imageio
    import gen_videos
    models = [inf.load_generator(paths.base_pkl), inf.load_generator(paths.base_pkl, [adapter_path])]
    ws = person_latent(models[0])
    params = torch.tensor([read_manifest(paths)['person']['params']])
    angles = gen_videos.orbit_angles(frames, yaw_range=0.6, pitch_range=0.15)
    cameras = torch.cat([inf.camera_label(models[0], yaw, pitch, device='cpu') for yaw, pitch in angles])
    truths = render_person(params, cameras, models[0].img_resolution)['image']

    def write(tmp):
        with imageio.get_writer(tmp, format='FFMPEG', mode='I', fps=fps, codec='libx264', quality=8) as writer:
            for i in range(frames):
                renders = [inf.render(G, ws, cameras[i:i + 1], NEURAL_RENDERING_RESOLUTION, seed=0)[0].clamp(-1, 1)
                           for G in models]
                writer.append_data(captioned_frame([truths[i]] + renders, ['ground truth', 'base', 'personalized']))
    with torch.no_grad():
        inf.atomic_write(path, write)


def viewer_command(paths: DemoPaths, adapter_path: Path) -> str:
    """The command that opens the demo identity in the browser viewer (eg3d/viewer.py, docs/viewer.md)."""
    return (f'{shown(Path(sys.executable))} {shown(REPO_ROOT / "eg3d" / "viewer.py")} --network={shown(paths.base_pkl)} '
            f'--adapter={shown(adapter_path)} --dataset={shown(paths.data)} --nrr={NEURAL_RENDERING_RESOLUTION}')

#----------------------------------------------------------------------------


def summary_lines(result: dict, base_info: dict, adapter_path: Path, base_pkl: Path, video: Path,
                  teaser: Optional[Path], timings: Dict[str, float]) -> List[str]:
    m = result['metrics']
    n_ad, n_base = result['adapter_params'], result['base_params']
    lpips_header = 'LPIPS*' if '*' in result['lpips_name'] else 'LPIPS'
    lines = ['', '=' * 78, 'Summary', '=' * 78,
             f'Base: {shown(base_pkl)} ({base_pkl.stat().st_size / 2**20:.1f} MiB), {base_info.get("steps", "?")} '
             f'training steps on the head family; on unseen heads of the family: PSNR '
             f'{base_info.get("eval_psnr", float("nan")):.1f} dB, depth error {base_info.get("eval_depth_error", float("nan")):.4f}',
             f'Trainable parameters: {n_ad:,} adapter parameters vs {n_base:,} in the full generator '
             f'({100 * n_ad / n_base:.2f}%)',
             f'Adapter file:         {shown(adapter_path)} ({adapter_path.stat().st_size / 1024:.0f} KiB)',
             '',
             f'Held-out views ({result["num_views"]}, yaw -0.6..+0.6 rad, poses not in training), against the exact '
             'renderer:',
             f'  {"model":<14s} {lpips_header:>8s} {"PSNR (dB)":>10s} {"depth error":>12s}']
    for name in ('base', 'personalized'):
        lines.append(f'  {name:<14s} {m[name]["lpips"]:8.4f} {m[name]["psnr"]:10.2f} {m[name]["depth_error"]:12.4f}')
    gain = m['personalized']['psnr'] - m['base']['psnr']
    lines += [f'  {result["lpips_name"]}; lower is better. PSNR: higher is better. Depth error: mean |depth - '
              'renderer depth| on the head at 32 px, world units (the head is ~0.35 wide).',
              f'  Personalized vs base: PSNR {gain:+.1f} dB (mean squared error about {10 ** (gain / 10):.1f}x lower), '
              f'LPIPS {m["base"]["lpips"] / max(m["personalized"]["lpips"], 1e-12):.1f}x lower.']
    if not (m['personalized']['psnr'] > m['base']['psnr'] and m['personalized']['lpips'] < m['base']['lpips']):
        lines.append('  WARNING: the personalized model is not closer to the person than the base on both '
                     'metrics; train longer (--kimg) or check the setup.')
    lines += ['',
              f'Image grid (rows ground truth | base | personalized, then their depth maps; columns held-out views): '
              f'{shown(result["grid"])}',
              f'Orbit video (ground truth | base | personalized): {shown(video)}']
    if teaser is not None:
        lines.append(f'Teaser: {shown(teaser)}')
    lines.append('Time: ' + ', '.join(f'{k} {v:.0f} s' for k, v in timings.items()))
    lines.append('Training used --lpips=none (MSE + density regularisation): pretrained LPIPS weights cannot be '
                 'downloaded offline.')
    return lines


@click.command()
@click.option('--outdir', default=str(REPO_ROOT / 'runs' / 'demo'), show_default='runs/demo',
              help='Where training runs go (a new <NNNNN>-... directory each time)')
@click.option('--base', 'base_pkl', default=str(REPO_ROOT / 'networks' / 'demo-heads.pkl'),
              show_default='networks/demo-heads.pkl', help='Base generator trained on the head family (not retrained)')
@click.option('--data', default=str(REPO_ROOT / 'datasets' / 'demo'), show_default='datasets/demo',
              help='Identity folder; <data>-heldout and <data>-groundtruth sit beside it')
@click.option('--seed', type=click.IntRange(min=0), default=0, show_default=True,
              help='Seed of the training poses and of training')
@click.option('--views', type=click.IntRange(min=1), default=32, show_default=True, help='Training selfies')
@click.option('--heldout', type=click.IntRange(min=1), default=8, show_default=True, help='Held-out views')
@click.option('--kimg', type=click.FloatRange(min=0, min_open=True), default=0.08, show_default=True,
              help='Training length in thousands of images')
@click.option('--batch', type=click.IntRange(min=1), default=2, show_default=True, help='Batch size')
@click.option('--lr', type=click.FloatRange(min=0, min_open=True), default=0.02, show_default=True,
              help='Adam learning rate of the adapters')
@click.option('--frames', type=click.IntRange(min=1), default=36, show_default=True, help='Frames of the orbit video')
@click.option('--fps', type=click.IntRange(min=1), default=12, show_default=True)
@click.option('--teaser', is_flag=True, help='Also save the image grid as docs/teaser.png')
def main(outdir, base_pkl, data, seed, views, heldout, kimg, batch, lr, frames, fps, teaser):
    """Personalize a small head-rendering EG3D to a person outside its family on CPU; compare with the exact renderer."""
    paths = DemoPaths.from_options(base_pkl, data, outdir)
    recipe = Recipe(seed=seed, views=views, heldout=heldout)
    if batch > views:
        raise DemoError(f'--batch={batch} is larger than the {views} training views')
    start = time.time()
    timings = {}

    say(f'==> [1/4] Base EG3D trained on the head family: {shown(paths.base_pkl)}')
    t0 = time.time()
    G_base, base_info = load_base(paths.base_pkl)
    say(f'    {base_info.get("steps", "?")} training steps; unseen heads of the family: PSNR '
        f'{base_info.get("eval_psnr", float("nan")):.1f} dB, depth error {base_info.get("eval_depth_error", float("nan")):.4f}')
    say(f'==> [2/4] The person: {shown(paths.data)}, {shown(paths.heldout)}, {shown(paths.groundtruth)}')
    prepare_identity(paths, recipe, G_base)
    timings['data'] = time.time() - t0

    step_images = step_batch(RECIPES[DEFAULT_RECIPE], batch, batch, 1, 1)[0]  # train.py's default recipe's step
    steps = math.ceil(kimg * 1000 / step_images)
    say(f'==> [3/4] Training rank-1 LoRA adapters on CPU: {steps} steps of {step_images} image(s) ({kimg:g} kimg, '
        f'recipe {DEFAULT_RECIPE})')
    t0 = time.time()
    run_dir = train(paths, kimg, batch, lr, seed)
    adapter_path = latest_adapter(run_dir)
    timings['training'] = time.time() - t0

    say(f'==> [4/4] Evaluating on {heldout} held-out views; rendering the orbit video ({frames} frames)')
    t0 = time.time()
    result = evaluate(paths, adapter_path, run_dir)
    video = run_dir / 'orbit.mp4'
    write_orbit(paths, adapter_path, video, frames, fps)
    teaser_path = None
    if teaser:
        teaser_path = REPO_ROOT / 'docs' / 'teaser.png'
        inf.atomic_write(teaser_path, lambda tmp: shutil.copyfile(result['grid'], tmp))
    timings['evaluation'] = time.time() - t0
    timings['total'] = time.time() - start

    summary = dict(run_dir=str(run_dir), adapter=str(adapter_path), grid=str(result['grid']), video=str(video),
                   lpips_name=result['lpips_name'], metrics=result['metrics'], adapter_params=result['adapter_params'],
                   base_params=result['base_params'], adapter_bytes=adapter_path.stat().st_size,
                   base=dict(path=str(paths.base_pkl), **base_info), recipe=asdict(recipe), kimg=kimg, batch=batch,
                   lr=lr, timings_s=timings)
    (run_dir / 'demo_summary.json').write_text(json.dumps(summary, indent=2))
    for line in summary_lines(result, base_info, adapter_path, paths.base_pkl, video, teaser_path, timings):
        say(line)
    say(f'Everything of this run: {shown(run_dir)} (demo_summary.json has the numbers)')
    say(f'See it in your browser (base beside personalized, any pose): {viewer_command(paths, adapter_path)}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
