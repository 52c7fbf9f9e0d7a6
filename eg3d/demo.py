"""End-to-end demo on CPU: personalize a tiny EG3D to a synthetic identity with rank-1 LoRA adapters.

    make demo                         # or: .venv/bin/python eg3d/demo.py

    1. base      networks/demo-base.pkl: a tiny random EG3D, a pure function of --seed
    2. identity  datasets/demo/ (training selfies, the real dataset format), datasets/demo-heldout/
                 (views kept out of training) and datasets/demo-groundtruth/ (the adapter that made
                 the person from the base, and a manifest); rendered by base + a known rank-1 change
    3. train     eg3d/train.py --lora=1 on the selfies, as a researcher would run it
    4. evaluate  held-out views: LPIPS / PSNR of base, personalized and ground truth; an image grid
                 (rows ground truth | base | personalized) and an orbit video of the personalized identity

Steps 1 and 2 are reused when their files are already there and match (re-running only trains and
evaluates again, in a new run directory). See docs/demo.md.
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

import legacy
from training import adapters
from training import inference as inf
from training import loss as loss_module
from training import synthetic_identity as si
from training.adapters.inject import adapter_layers, base_name

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = 'manifest.json'
GROUNDTRUTH_ADAPTER = 'groundtruth-adapter.safetensors'
NEURAL_RENDERING_RESOLUTION = 32  # the tiny base renders 32x32 features, superresolved to 128x128
EVAL_SEED = 100_000  # renderer jitter of the evaluation renders, unlike any dataset render
DEMO_SHAPE_LEVEL = 2.5  # the tiny base's raw density lies around 1.3-3.6, below EG3D's iso-level 10


@dataclass(frozen=True)
class Recipe:
    """Everything the demo identity is a function of; a change means the files are rebuilt."""
    seed: int
    views: int
    heldout: int
    rank: int
    strength: float
    version: int = 1  # bump when the generation code changes what it writes


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


def prepare_base(path: Path, seed: int) -> torch.nn.Module:
    """The tiny base generator; written to `path` unless a file with the same fingerprint is there."""
    G = si.build_tiny_generator(seed)
    fingerprint = adapters.fingerprint(G)
    if path.exists():
        try:
            data = legacy.load_network_pkl(str(path))
        except Exception as err:
            raise DemoError(f'{path} exists but cannot be read as a network pickle ({err}); '
                            'move it away (or run `make clean-demo`)') from err
        if adapters.fingerprint(data['G_ema']) == fingerprint:
            say(f'    reusing {shown(path)} (fingerprint {fingerprint["weights_sha256"][:12]} matches)')
            return G
        if not isinstance(data.get('demo_base'), dict):
            raise DemoError(f'{path} exists and is not the demo base generator; '
                            'move it away or pass --base=<other path>')
        say(f'    {shown(path)} was built by another demo version or seed; rebuilding it')
    path.parent.mkdir(parents=True, exist_ok=True)
    legacy.save_network_pkl(dict(G=G, G_ema=G, D=None, training_set_kwargs=None,
                                 demo_base=dict(seed=seed, builder='training.synthetic_identity.build_tiny_generator')),
                            str(path))
    say(f'    wrote {shown(path)}: {fingerprint["num_params"]:,} parameters, '
        f'fingerprint {fingerprint["weights_sha256"][:12]}')
    return G

#----------------------------------------------------------------------------
# Step 2: the synthetic identity and its ground truth.


def groundtruth_adapter(G_base: torch.nn.Module, G_person: torch.nn.Module, rank: int) -> torch.nn.Module:
    """A copy of G_base with rank-`rank` LoRA adapters that turn it into G_person exactly.

    G_person differs from G_base by a rank-`rank` change of conv weights; the top singular triplets
    of each difference, reshaped [out, in*k*k], are the adapter's factors (B = U S, A = V^T).
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(paths: DemoPaths) -> Optional[dict]:
    try:
        return json.loads((paths.groundtruth / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def model_fingerprints(G_base: torch.nn.Module, G_person: torch.nn.Module) -> Dict[str, str]:
    """sha256 of the base's and the person's weights: the identity files are a function of both."""
    return {'base_weights_sha256': adapters.fingerprint(G_base)['weights_sha256'],
            'person_weights_sha256': adapters.fingerprint(G_person)['weights_sha256']}


def identity_is_valid(paths: DemoPaths, recipe: Recipe, fingerprints: Dict[str, str],
                      G_base: torch.nn.Module) -> Tuple[bool, str]:
    """Whether the three folders hold exactly what `recipe` on these models would write (and why not)."""
    from training.dataset import DatasetError, read_identity
    manifest = read_manifest(paths)
    if manifest is None:
        return False, 'no manifest'
    if manifest.get('recipe') != asdict(recipe) or manifest.get('fingerprints') != fingerprints:
        return False, 'made with other settings or another base'
    for folder, key in ((paths.data, 'train'), (paths.heldout, 'heldout')):
        labels = folder / 'dataset.json'
        if not labels.is_file() or _sha256(labels) != manifest['dataset_json_sha256'].get(key):
            return False, f'{shown(labels)} is missing or changed'
        try:
            read_identity(str(folder), resolution=G_base.img_resolution, num_ws=G_base.backbone.num_ws,
                          w_dim=G_base.w_dim)
        except DatasetError as err:
            return False, str(err)
    truth = paths.groundtruth / GROUNDTRUTH_ADAPTER
    if not truth.is_file() or _sha256(truth) != manifest.get('groundtruth_adapter_sha256'):
        return False, f'{shown(truth)} is missing or changed'
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
    """Write the training selfies, held-out views and ground truth, unless valid ones are already there."""
    G_person = si.apply_low_rank_change(G_base, seed=recipe.seed + 1, rank=recipe.rank, strength=recipe.strength)
    fingerprints = model_fingerprints(G_base, G_person)
    valid, why = identity_is_valid(paths, recipe, fingerprints, G_base)
    if valid:
        say(f'    reusing {shown(paths.data)} ({recipe.views} views), {shown(paths.heldout)} ({recipe.heldout} views), '
            f'{shown(paths.groundtruth)}')
        return
    check_identity_folders_are_ours(paths)
    if read_manifest(paths) is not None:
        say(f'    rebuilding the demo identity: {why}')

    G_truth = groundtruth_adapter(G_base, G_person, recipe.rank)
    poses = training_poses(recipe.views, recipe.seed + 2) + heldout_poses(recipe.heldout)
    labels = camera_labels(G_base, poses)
    latents = si.identity_latents(G_base, len(poses), seed=recipe.seed + 3)
    say(f'    rendering {len(poses)} views of the person (base + a rank-{recipe.rank} change of every conv weight, '
        f'strength {recipe.strength:g})...')
    t0 = time.time()
    images = si.render_views(G_person, labels, latents, seed=recipe.seed + 4,
                             neural_rendering_resolution=NEURAL_RENDERING_RESOLUTION)
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
        adapters.save(G_truth, str(tmp[paths.groundtruth] / GROUNDTRUTH_ADAPTER))
        manifest = dict(
            recipe=asdict(recipe), fingerprints=fingerprints,
            groundtruth_adapter_sha256=_sha256(tmp[paths.groundtruth] / GROUNDTRUTH_ADAPTER),
            dataset_json_sha256={'train': _sha256(tmp[paths.data] / 'dataset.json'),
                                 'heldout': _sha256(tmp[paths.heldout] / 'dataset.json')},
            poses_yaw_pitch={'train': poses[:v], 'heldout': poses[v:]},
            about=('Synthetic identity of the demo: images rendered by the base generator with the '
                   f'ground-truth adapter {GROUNDTRUTH_ADAPTER} applied; written by eg3d/demo.py.'))
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
    say(f'    wrote {shown(paths.groundtruth)}: {GROUNDTRUTH_ADAPTER} (kept out of the dataset), {MANIFEST}')

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
# Step 4: evaluation on the held-out views.


def evaluation_lpips() -> Tuple[torch.nn.Module, str]:
    """Pretrained AlexNet LPIPS when its weights are in the torch hub cache, else a seeded random-backbone LPIPS."""
    if os.path.isfile(loss_module.lpips_backbone_path('alex')):
        return inf.build_lpips('alex'), 'LPIPS (AlexNet, pretrained)'
    with inf.seeded(0):
        model = inf.build_lpips('alex-random')
    return model, 'LPIPS* (random AlexNet backbone: pretrained weights not in the torch hub cache)'


@torch.no_grad()
def render_heldout(G: torch.nn.Module, cameras: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Every held-out view from its own latent and camera, renderer jitter seeded per view."""
    return torch.cat([inf.render(G, latents[i:i + 1], cameras[i:i + 1], NEURAL_RENDERING_RESOLUTION, seed=EVAL_SEED + i)
                      for i in range(len(cameras))])


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
    """Metrics of base / personalized / ground truth against the held-out views; writes the grid."""
    from training.dataset import read_identity
    G_base = inf.load_generator(paths.base_pkl)
    models = {'base': G_base,
              'personalized': inf.load_generator(paths.base_pkl, [adapter_path]),
              'ground truth': inf.load_generator(paths.base_pkl, [paths.groundtruth / GROUNDTRUTH_ADAPTER])}
    names, images, cameras, latents = read_identity(str(paths.heldout), resolution=G_base.img_resolution,
                                                    num_ws=G_base.backbone.num_ws, w_dim=G_base.w_dim)
    view_index = [int(Path(name).stem.split('_')[-1]) for name in names]  # image_<i>.png is held-out pose i
    order = np.argsort(view_index)  # read_identity sorts names as text (image_10 before image_2)
    photos = torch.from_numpy(images[order]).float() / 127.5 - 1
    cameras, latents = torch.from_numpy(cameras[order]), torch.from_numpy(latents[order])
    lpips_model, lpips_name = evaluation_lpips()
    renders, metrics = {}, {}
    for name, G in models.items():
        renders[name] = render_heldout(G, cameras, latents)
        metrics[name] = dict(lpips=float(inf.lpips_distance(lpips_model, renders[name], photos).mean()),
                             psnr=float(inf.psnr(renders[name], photos).mean()))
    poses = read_manifest(paths)['poses_yaw_pitch']['heldout']
    grid_path = run_dir / 'heldout_grid.png'
    rows = [('ground truth', photos), ('base', renders['base']), ('personalized', renders['personalized'])]
    write_png(labelled_grid(rows, [f'yaw {poses[view_index[i]][0]:+.2f}' for i in order]), grid_path)
    table = adapters.parameter_table(models['personalized'])
    return dict(metrics=metrics, lpips_name=lpips_name, grid=grid_path, num_views=len(photos),
                adapter_params=table['adapter_total'], base_params=table['base_total'])


def write_orbit(paths: DemoPaths, adapter_path: Path, path: Path, frames: int, fps: int) -> None:
    """Orbit video of the personalized identity at the mean latent of its training selfies."""
    import gen_videos
    from training.dataset import read_identity
    G = inf.load_generator(paths.base_pkl, [adapter_path])
    _, _, _, latents = read_identity(str(paths.data), resolution=G.img_resolution, num_ws=G.backbone.num_ws,
                                     w_dim=G.w_dim)
    ws = torch.from_numpy(latents).mean(dim=0, keepdim=True)
    angles = gen_videos.orbit_angles(frames, yaw_range=0.35, pitch_range=0.25)
    gen_videos.write_video(path, G, [ws], angles, fps, inf.DEFAULT_FOV_DEG, NEURAL_RENDERING_RESOLUTION,
                           render_seed=0, desc='orbit')

def viewer_command(paths: DemoPaths, adapter_path: Path) -> str:
    """The command that opens the demo identity in the browser viewer (eg3d/viewer.py, docs/viewer.md)."""
    return (f'{shown(Path(sys.executable))} {shown(REPO_ROOT / "eg3d" / "viewer.py")} --network={shown(paths.base_pkl)} '
            f'--adapter={shown(adapter_path)} --dataset={shown(paths.data)} --nrr={NEURAL_RENDERING_RESOLUTION} '
            f'--shape-level={DEMO_SHAPE_LEVEL}')

#----------------------------------------------------------------------------


def summary_lines(result: dict, adapter_path: Path, base_pkl: Path, video: Path, teaser: Optional[Path],
                  timings: Dict[str, float]) -> List[str]:
    m = result['metrics']
    n_ad, n_base = result['adapter_params'], result['base_params']
    lines = ['', '=' * 78, 'Summary', '=' * 78,
             f'Trainable parameters: {n_ad:,} adapter parameters vs {n_base:,} in the full generator '
             f'({100 * n_ad / n_base:.2f}%)',
             f'Adapter file:         {shown(adapter_path)} ({adapter_path.stat().st_size / 1024:.0f} KiB; '
             f'base pickle {base_pkl.stat().st_size / 2**20:.1f} MiB)',
             '',
             f'Held-out views ({result["num_views"]}, poses not in training), against the ground-truth images:',
             f'  {"model":<14s} {"LPIPS*" if "*" in result["lpips_name"] else "LPIPS":>8s} {"PSNR (dB)":>10s}']
    for name in ('base', 'personalized', 'ground truth'):
        lines.append(f'  {name:<14s} {m[name]["lpips"]:8.4f} {m[name]["psnr"]:10.2f}')
    lines += [f'  {result["lpips_name"]}; lower is better. PSNR: higher is better.',
              '  "ground truth" = the generator that made the images, rendered with other ray-sampling jitter:',
              '  the best any model can score here.',
              f'  Personalized vs base: PSNR {m["personalized"]["psnr"] - m["base"]["psnr"]:+.1f} dB '
              f'(mean squared error about {10 ** ((m["personalized"]["psnr"] - m["base"]["psnr"]) / 10):.1f}x lower), '
              f'LPIPS {m["base"]["lpips"] / max(m["personalized"]["lpips"], 1e-12):.1f}x lower.']
    if not (m['personalized']['psnr'] > m['base']['psnr'] and m['personalized']['lpips'] < m['base']['lpips']):
        lines.append('  WARNING: the personalized model is not closer to the ground truth than the base on both '
                     'metrics; train longer (--kimg) or check the setup.')
    lines += ['',
              f'Image grid (rows ground truth | base | personalized; columns held-out views): {shown(result["grid"])}',
              f'Orbit video of the personalized identity: {shown(video)}']
    if teaser is not None:
        lines.append(f'Teaser: {shown(teaser)}')
    lines.append('Time: ' + ', '.join(f'{k} {v:.0f} s' for k, v in timings.items()))
    lines.append('Training used --lpips=none (MSE + density regularisation): pretrained LPIPS weights cannot be '
                 'downloaded offline.')
    return lines


@click.command()
@click.option('--outdir', default=str(REPO_ROOT / 'runs' / 'demo'), show_default='runs/demo',
              help='Where training runs go (a new <NNNNN>-... directory each time)')
@click.option('--base', 'base_pkl', default=str(REPO_ROOT / 'networks' / 'demo-base.pkl'),
              show_default='networks/demo-base.pkl', help='Tiny base generator pickle (built if missing)')
@click.option('--data', default=str(REPO_ROOT / 'datasets' / 'demo'), show_default='datasets/demo',
              help='Identity folder; <data>-heldout and <data>-groundtruth sit beside it')
@click.option('--seed', type=click.IntRange(min=0), default=0, show_default=True,
              help='Seed of base, person and training')
@click.option('--views', type=click.IntRange(min=1), default=50, show_default=True, help='Training selfies')
@click.option('--heldout', type=click.IntRange(min=1), default=8, show_default=True, help='Held-out views')
@click.option('--strength', type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help='Size of the rank-1 change that makes the person (relative to each weight\'s norm)')
@click.option('--kimg', type=click.FloatRange(min=0, min_open=True), default=0.08, show_default=True,
              help='Training length in thousands of images')
@click.option('--batch', type=click.IntRange(min=1), default=2, show_default=True, help='Batch size')
@click.option('--lr', type=click.FloatRange(min=0, min_open=True), default=0.02, show_default=True,
              help='Adam learning rate of the adapters')
@click.option('--frames', type=click.IntRange(min=1), default=48, show_default=True, help='Frames of the orbit video')
@click.option('--fps', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--teaser', is_flag=True, help='Also save the image grid as docs/teaser.png')
def main(outdir, base_pkl, data, seed, views, heldout, strength, kimg, batch, lr, frames, fps, teaser):
    """Personalize a tiny EG3D to a synthetic identity on CPU, then compare base, personalized and ground truth."""
    paths = DemoPaths.from_options(base_pkl, data, outdir)
    recipe = Recipe(seed=seed, views=views, heldout=heldout, rank=1, strength=strength)
    if batch > views:
        raise DemoError(f'--batch={batch} is larger than the {views} training views')
    start = time.time()
    timings = {}

    say(f'==> [1/4] Tiny base EG3D (seed {seed}): {shown(paths.base_pkl)}')
    t0 = time.time()
    G_base = prepare_base(paths.base_pkl, seed)
    say(f'==> [2/4] Synthetic identity: {shown(paths.data)}, {shown(paths.heldout)}, {shown(paths.groundtruth)}')
    prepare_identity(paths, recipe, G_base)
    timings['data'] = time.time() - t0

    steps = math.ceil(kimg * 1000 / batch)
    say(f'==> [3/4] Training rank-1 LoRA adapters on CPU: {steps} steps of {batch} images ({kimg:g} kimg)')
    t0 = time.time()
    run_dir = train(paths, kimg, batch, lr, seed)
    adapter_path = latest_adapter(run_dir)
    timings['training'] = time.time() - t0

    say(f'==> [4/4] Evaluating on {heldout} held-out views; rendering the orbit video ({frames} frames)')
    t0 = time.time()
    result = evaluate(paths, adapter_path, run_dir)
    video = run_dir / 'orbit_personalized.mp4'
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
                   recipe=asdict(recipe), kimg=kimg, batch=batch, lr=lr, timings_s=timings)
    (run_dir / 'demo_summary.json').write_text(json.dumps(summary, indent=2))
    for line in summary_lines(result, adapter_path, paths.base_pkl, video, teaser_path, timings):
        say(line)
    say(f'Everything of this run: {shown(run_dir)} (demo_summary.json has the numbers)')
    say(f'See it in your browser (base beside personalized, any pose): {viewer_command(paths, adapter_path)}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
