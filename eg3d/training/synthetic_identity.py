"""A tiny deterministic EG3D and a synthetic identity rendered from it, in the real dataset format.

Tests (and the demo) need a base generator and a personal dataset whose ground truth is known:

  G_base   = build_tiny_generator(seed)              # small random TriPlaneGenerator (golden tiny128 config)
  G_person = apply_low_rank_change(G_base, seed, r)  # copy with a rank-r change of every conv weight
  write_identity(G_person, G_base, outdir, ...)      # selfies rendered by G_person: image_N.png,
                                                     # image_N_latent.npy, dataset.json; + base.pkl

Training adapters of rank >= r on G_base (never on G_person) can reach G_person exactly, so the
reconstruction loss of views held out from training must fall.

Several people on one base (`write_identities`) make a multi-identity dataset: a folder with one
identity folder per person.

Command line (writes <outdir>/train, <outdir>/heldout and <outdir>/base.pkl; with --people=K,
<outdir>/people/person_<k>, <outdir>/heldout/person_<k> and <outdir>/base.pkl):
    python -m training.synthetic_identity --outdir=datasets/synthetic --views=24 --heldout=6
"""

import copy
import json
import os
from typing import Optional

import numpy as np
import PIL.Image
import torch

import dnnlib
from camera_utils import FFHQ_INTRINSICS, FFHQ_PIVOT, FFHQ_RADIUS, LookAtPoseSampler


def tiny_generator_kwargs(**overrides) -> dict:
    """Constructor kwargs of the golden tiny128 TriPlaneGenerator (tests/data/golden/README.md)."""
    rendering_kwargs = {
        'image_resolution': 128, 'disparity_space_sampling': False, 'clamp_mode': 'softplus',
        'superresolution_module': 'training.superresolution.SuperresolutionHybrid2X',
        'c_gen_conditioning_zero': True, 'gpc_reg_prob': None, 'c_scale': 1.0,
        'superresolution_noise_mode': 'none', 'density_reg': 0.25, 'density_reg_p_dist': 0.004,
        'reg_type': 'l1', 'decoder_lr_mul': 1.0, 'sr_antialias': True,
        'depth_resolution': 12, 'depth_resolution_importance': 12, 'ray_start': 2.25, 'ray_end': 3.3,
        'box_warp': 1, 'avg_camera_radius': FFHQ_RADIUS, 'avg_camera_pivot': list(FFHQ_PIVOT),
    }
    kwargs = dict(z_dim=64, w_dim=512, mapping_kwargs={'num_layers': 2}, channel_base=2048, channel_max=32,
                  fused_modconv_default='inference_only', rendering_kwargs=rendering_kwargs,
                  num_fp16_res=0, sr_num_fp16_res=0,
                  sr_kwargs={'channel_base': 2048, 'channel_max': 32, 'fused_modconv_default': 'inference_only'},
                  conv_clamp=None, c_dim=25, img_resolution=128, img_channels=3)
    rendering_overrides = overrides.pop('rendering_kwargs', {})
    kwargs.update(overrides)
    kwargs['rendering_kwargs'].update(rendering_overrides)
    return kwargs


def reduced_ffhq_generator_kwargs() -> dict:
    """FFHQ's backbone widths (channel_base 32768, channel_max 512: conv fan-ins up to 4608) at 128 px output
    (SuperresolutionHybrid2X, fp32) with 12 + 12 samples per ray: a CPU step takes seconds, while adapted
    layers have the shapes they have in the official FFHQ 512 generator."""
    from training import configs
    kwargs = configs.generator_kwargs('ffhq', 128, sr_num_fp16_res=0)
    kwargs['rendering_kwargs'].update(depth_resolution=12, depth_resolution_importance=12)
    return kwargs


def build_tiny_generator(seed: int = 0, sr_residual_gain: float = 0.1, **overrides) -> torch.nn.Module:
    """Small random TriPlaneGenerator in eval mode, a pure function of `seed` (as the golden tiny128).

    Constant-initialised entries are randomised so that every layer matters: biases + 0.2 N(0,1),
    noise strengths 0.1 N(0,1), w_avg 0.5 N(0,1); the decoder's density bias + 3 (mostly opaque rays);
    the superresolution torgb layers scaled by `sr_residual_gain`.
    """
    from training.triplane import TriPlaneGenerator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G = TriPlaneGenerator(**tiny_generator_kwargs(**overrides))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in list(G.named_parameters()) + list(G.named_buffers()):
            if name.endswith('bias'):
                tensor.add_(0.2 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith('noise_strength'):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            elif name == 'backbone.mapping.w_avg':
                tensor.copy_(0.5 * torch.randn(tensor.shape, generator=gen))
        G.decoder.net[2].bias[0] += 3.0
        # Quiet superresolution residuals: the image is then close to the upsampled raw render, as in a
        # trained EG3D, so the low- and full-resolution reconstruction terms agree on one optimum.
        for name, tensor in G.superresolution.named_parameters():
            if '.torgb.' in name and (name.endswith('.weight') or name.endswith('.bias')):
                tensor.mul_(sr_residual_gain)
    return G.eval().requires_grad_(False)


def apply_low_rank_change(G: torch.nn.Module, seed: int = 1, rank: int = 1, strength: float = 0.5,
                          components=('backbone.synthesis', 'superresolution')) -> torch.nn.Module:
    """Copy of G with W += strength * ||W|| * U V^T / sqrt(rank) on every conv weight of `components`.

    U [out, rank] and V [rank, in*k*k] have orthonormal columns / rows (seeded), so each change has
    rank `rank` as a matrix [out, in*k*k]: what a rank-`rank` adapter can represent.
    """
    G = copy.deepcopy(G)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in G.named_parameters():
            if not (name.startswith(components) and name.endswith('weight') and weight.ndim == 4):
                continue
            out_ch = weight.shape[0]
            fan = weight[0].numel()
            r = min(rank, out_ch, fan)
            u = torch.linalg.qr(torch.randn(out_ch, r, generator=gen))[0]
            v = torch.linalg.qr(torch.randn(fan, r, generator=gen))[0].T
            delta = (u @ v) * (strength * weight.norm() / np.sqrt(r))
            weight.add_(delta.reshape(weight.shape))
    return G


def camera_labels(num_views: int, seed: int, yaw_range: float = 0.45, pitch_range: float = 0.2,
                  pivot=FFHQ_PIVOT, radius: float = FFHQ_RADIUS) -> np.ndarray:
    """FFHQ-like cameras [num_views, 25]: yaw/pitch offsets uniform in the ranges, looking at the pivot."""
    rnd = np.random.RandomState(seed)
    yaws = rnd.uniform(-yaw_range, yaw_range, num_views)
    pitches = rnd.uniform(-pitch_range, pitch_range, num_views)
    lookat = torch.tensor(pivot, dtype=torch.float32)
    labels = []
    for yaw, pitch in zip(yaws, pitches):
        pose = LookAtPoseSampler.sample(np.pi / 2 + yaw, np.pi / 2 + pitch, lookat, radius=radius)
        labels.append(np.concatenate([pose.reshape(16).numpy(), np.asarray(FFHQ_INTRINSICS, np.float32)]))
    return np.stack(labels).astype(np.float32)


def identity_latents(G: torch.nn.Module, num_views: int, seed: int, psi: float = 0.7, spread: float = 0.1) -> np.ndarray:
    """W+ latents [num_views, num_ws, w_dim] of one person: w_id (truncated) plus a small per-view change."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn([num_views + 1, G.z_dim], generator=gen)
    c = torch.zeros([num_views + 1, G.c_dim])
    with torch.no_grad():
        ws = G.mapping(z, c, truncation_psi=1)
    w_avg = G.backbone.mapping.w_avg
    w_id = w_avg + psi * (ws[:1] - w_avg)
    return (w_id + spread * (ws[1:] - w_avg)).numpy().astype(np.float32)


@torch.no_grad()
def render_views(G: torch.nn.Module, labels: np.ndarray, latents: np.ndarray, seed: int,
                 neural_rendering_resolution: int = 32) -> np.ndarray:
    """uint8 images [N, 3, R, R]; view i is rendered with torch.manual_seed(seed + i) (renderer jitter)."""
    images = []
    with torch.random.fork_rng(devices=[]):
        for i in range(len(labels)):
            torch.manual_seed(seed + i)
            img = G.synthesis(torch.from_numpy(latents[i:i + 1]), torch.from_numpy(labels[i:i + 1]),
                              neural_rendering_resolution=neural_rendering_resolution, noise_mode='const')['image']
            images.append((img[0] * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy())
    return np.stack(images)


def write_dataset(outdir: str, images: np.ndarray, labels: np.ndarray, latents: np.ndarray,
                  latent_format: str = 'w+') -> None:
    """Write image_N.png, image_N_latent.npy ([1, num_ws, w_dim] for 'w+', [1, w_dim] for 'w') and dataset.json."""
    os.makedirs(outdir, exist_ok=True)
    entries = []
    for i, (image, label, ws) in enumerate(zip(images, labels, latents)):
        name = f'image_{i}.png'
        PIL.Image.fromarray(image.transpose(1, 2, 0), 'RGB').save(os.path.join(outdir, name))
        latent = ws[np.newaxis] if latent_format == 'w+' else ws[:1]
        np.save(os.path.join(outdir, f'image_{i}_latent.npy'), latent.astype(np.float32))
        entries.append([name, [float(x) for x in label]])
    with open(os.path.join(outdir, 'dataset.json'), 'w') as f:
        json.dump({'labels': entries}, f)


def save_generator_pkl(G: torch.nn.Module, path: str) -> None:
    """EG3D-layout pickle with G and G_ema (the same network) and no D, through legacy.save_network_pkl."""
    import legacy
    G = copy.deepcopy(G).eval().requires_grad_(False).cpu()
    legacy.save_network_pkl(dict(G=G, G_ema=G, training_set_kwargs=None), path)


def write_person(G_base: torch.nn.Module, train_dir: str, heldout_dir: Optional[str], seed: int, views: int,
                 heldout: int, rank: int = 1, strength: float = 0.5, neural_rendering_resolution: int = 32,
                 latent_format: str = 'w+') -> torch.nn.Module:
    """Render one synthetic person of G_base (its low-rank change, cameras and latents from `seed`); return G_person.

    Writes `views` selfies to train_dir and `heldout` more to heldout_dir (same format).
    """
    G_person = apply_low_rank_change(G_base, seed=seed + 1, rank=rank, strength=strength)
    total = views + heldout
    labels = camera_labels(total, seed=seed + 2)
    latents = identity_latents(G_base, total, seed=seed + 3)
    images = render_views(G_person, labels, latents, seed=seed + 4,
                          neural_rendering_resolution=neural_rendering_resolution)
    write_dataset(train_dir, images[:views], labels[:views], latents[:views], latent_format)
    if heldout > 0:
        write_dataset(heldout_dir, images[views:], labels[views:], latents[views:], latent_format)
    return G_person


def write_identity(outdir: str, seed: int = 0, views: int = 24, heldout: int = 6, rank: int = 1,
                   strength: float = 0.5, neural_rendering_resolution: int = 32, latent_format: str = 'w+',
                   generator_overrides: Optional[dict] = None) -> dict:
    """Build base + person from `seed`; write <outdir>/train, <outdir>/heldout (same format) and <outdir>/base.pkl.

    Returns paths and the in-memory networks: dict(base_pkl, train, heldout, G_base, G_person).
    """
    G_base = build_tiny_generator(seed, **(generator_overrides or {}))
    paths = dnnlib.EasyDict(base_pkl=os.path.join(outdir, 'base.pkl'), train=os.path.join(outdir, 'train'),
                            heldout=os.path.join(outdir, 'heldout'))
    G_person = write_person(G_base, paths.train, paths.heldout, seed, views, heldout, rank, strength,
                            neural_rendering_resolution, latent_format)
    save_generator_pkl(G_base, paths.base_pkl)
    return dnnlib.EasyDict(paths, G_base=G_base, G_person=G_person)


def write_identities(outdir: str, count: int, seed: int = 0, views: int = 8, heldout: int = 2, rank: int = 1,
                     strength: float = 0.5, neural_rendering_resolution: int = 32) -> dict:
    """`count` synthetic people on one tiny base: <outdir>/people/person_<k>/ (a folder of identities, the
    multi-identity --data), <outdir>/heldout/person_<k>/ and <outdir>/base.pkl.

    Person k is the person `write_identity` makes with seed + 10 k, on the base of `seed`.
    Returns dict(base_pkl, people, heldout, names).
    """
    G_base = build_tiny_generator(seed)
    paths = dnnlib.EasyDict(base_pkl=os.path.join(outdir, 'base.pkl'), people=os.path.join(outdir, 'people'),
                            heldout=os.path.join(outdir, 'heldout'), names=[f'person_{k}' for k in range(count)])
    for k, name in enumerate(paths.names):
        write_person(G_base, os.path.join(paths.people, name), os.path.join(paths.heldout, name), seed + 10 * k,
                     views, heldout, rank, strength, neural_rendering_resolution)
    save_generator_pkl(G_base, paths.base_pkl)
    return paths


def ensure_identity(outdir: str, count: Optional[int] = None, **kwargs) -> dnnlib.EasyDict:
    """`write_identity(outdir, **kwargs)` (or `write_identities(outdir, count, ...)`) unless outdir already
    holds one made with the same arguments.

    For test suites: several test files share one synthetic identity per pytest session.
    Returns the paths (base_pkl, train, heldout; for `count`: base_pkl, people, heldout, names).
    """
    import shutil
    import tempfile
    key = json.dumps(dict(kwargs, count=count) if count is not None else kwargs, sort_keys=True)
    marker = os.path.join(outdir, 'synthetic_identity.json')
    if not (os.path.isfile(marker) and open(marker).read() == key):
        parent = os.path.dirname(os.path.abspath(outdir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix='.synthetic-')
        if count is None:
            write_identity(tmp, **kwargs)
        else:
            write_identities(tmp, count, **kwargs)
        with open(os.path.join(tmp, 'synthetic_identity.json'), 'w') as f:
            f.write(key)
        shutil.rmtree(outdir, ignore_errors=True)
        os.replace(tmp, outdir)
    if count is not None:
        return dnnlib.EasyDict(base_pkl=os.path.join(outdir, 'base.pkl'), people=os.path.join(outdir, 'people'),
                               heldout=os.path.join(outdir, 'heldout'), names=[f'person_{k}' for k in range(count)])
    return dnnlib.EasyDict(base_pkl=os.path.join(outdir, 'base.pkl'), train=os.path.join(outdir, 'train'),
                           heldout=os.path.join(outdir, 'heldout'))


if __name__ == '__main__':
    import argparse
    parser = argparse.ArgumentParser(description='Write a tiny base EG3D and a synthetic identity dataset.')
    parser.add_argument('--outdir', required=True)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--views', type=int, default=24)
    parser.add_argument('--heldout', type=int, default=6)
    parser.add_argument('--rank', type=int, default=1)
    parser.add_argument('--strength', type=float, default=0.5)
    parser.add_argument('--people', type=int, default=None, help='write this many people on one base')
    args = parser.parse_args()
    if args.people is None:
        out = write_identity(args.outdir, seed=args.seed, views=args.views, heldout=args.heldout,
                             rank=args.rank, strength=args.strength)
        print(f'Wrote {out.train}, {out.heldout} and {out.base_pkl}')
    else:
        out = write_identities(args.outdir, args.people, seed=args.seed, views=args.views, heldout=args.heldout,
                               rank=args.rank, strength=args.strength)
        print(f'Wrote {args.people} people to {out.people} (held-out views in {out.heldout}) and {out.base_pkl}')
