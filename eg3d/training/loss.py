"""Personalization objective (My3DGen): reconstruct each selfie from its latent and camera.

Per batch of (photo, camera, latent):
  render = G.synthesis(ws, c, noise_mode='const')
  recon  = MSE + LPIPS between render and photo, at full resolution ('image') and at the neural
           rendering resolution ('image_raw' against the photo filtered down as EG3D does).
Optional terms: identity (1 - ArcFace cosine, render vs photo), symmetric-view identity
(two renders at mirrored yaws, one flipped back), EG3D's L1 density regularisation (lazy: every
`density_reg_every` steps, with the lazy-regularisation gain), and AdaLoRA's orthogonal
regularisation (added by the training loop, it depends on no batch).

Every term is a mean over the samples of the batch; the training loop weights chunks of a batch
by their share, so the loss of a step is the mean over its global batch.
"""

import os
from typing import Dict, Optional

import numpy as np
import torch

from camera_utils import FFHQ_INTRINSICS, FFHQ_RADIUS, LookAtPoseSampler
from torch_utils.ops import upfirdn2d
from training.dual_discriminator import filtered_resizing

#----------------------------------------------------------------------------
# LPIPS

LPIPS_CHOICES = ('alex', 'vgg', 'none', 'alex-random', 'vgg-random')

# Checkpoints torchvision loads for LPIPS' backbones (torch hub cache, `<hub dir>/checkpoints/<file>`).
LPIPS_BACKBONE_FILES = {'alex': 'alexnet-owt-7be5be79.pth', 'vgg': 'vgg16-397923af.pth'}


class LPIPSUnavailable(RuntimeError):
    """The pretrained LPIPS backbone could not be loaded (usually: offline and not in the torch hub cache)."""


def lpips_backbone_path(net: str) -> str:
    """Where torchvision looks for the ImageNet weights of an LPIPS backbone."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', LPIPS_BACKBONE_FILES[net])


def make_lpips(net: str, device: torch.device) -> Optional[torch.nn.Module]:
    """LPIPS module (frozen, eval) for --lpips; None for 'none'.

    'alex' / 'vgg': the real metric (torchvision ImageNet backbone + LPIPS' linear heads, which the
    `lpips` package ships). '<net>-random': random backbone, for tests only (no download).
    """
    if net == 'none':
        return None
    if net not in LPIPS_CHOICES:
        raise ValueError(f'--lpips must be one of {", ".join(LPIPS_CHOICES)}; got {net!r}')
    import warnings
    try:
        import lpips
    except ImportError as err:
        raise LPIPSUnavailable('--lpips needs the `lpips` package (pip install lpips), or pass --lpips=none') from err
    base, random_backbone = net.split('-')[0], net.endswith('-random')
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter('ignore')  # torchvision's 'pretrained' deprecation notices
            torch.manual_seed(0)  # the random backbone of '<net>-random' is the same in every process and run
            module = lpips.LPIPS(net=base, pretrained=True, pnet_rand=random_backbone, verbose=False)
    except Exception as err:
        path = lpips_backbone_path(base)
        raise LPIPSUnavailable(
            f'--lpips={net}: cannot load the pretrained {base} backbone ({type(err).__name__}: {err}).\n'
            f'Offline, put the torchvision checkpoint at\n    {path}\n'
            f'(torch hub checkpoints dir; set TORCH_HOME to move it; the file is {LPIPS_BACKBONE_FILES[base]} '
            f'from torchvision\'s model zoo), or pass --lpips=none to train without LPIPS.') from err
    return module.eval().requires_grad_(False).to(device)


def lpips_distance(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample LPIPS of images in [-1, 1]; inputs under 32 px are upsampled (AlexNet needs >= 32)."""
    if x.shape[-1] < 32:
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode='bilinear', align_corners=False)
        y = torch.nn.functional.interpolate(y, size=(32, 32), mode='bilinear', align_corners=False)
    return module(x, y).reshape(x.shape[0])

#----------------------------------------------------------------------------
# Identity (ArcFace)


def identity_embedding(arcface: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
    """ArcFace embedding of images in [-1, 1]; the whole aligned image is pooled to 112x112 (My3DGen)."""
    img = torch.nn.functional.adaptive_avg_pool2d(img.clamp(-1, 1), (112, 112))
    return arcface(img)


def identity_loss(arcface: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 - cosine similarity of ArcFace embeddings."""
    return 1 - torch.nn.functional.cosine_similarity(identity_embedding(arcface, x), identity_embedding(arcface, y), dim=1)


def mirrored_cameras(G: torch.nn.Module, batch_size: int, device: torch.device,
                     yaw_range: float = 0.35, pitch_range: float = 0.25):
    """Two cameras per sample at yaw +d and -d (same pitch) around the generator's average pivot."""
    rk = G.rendering_kwargs
    pivot = torch.tensor(rk.get('avg_camera_pivot', [0, 0, 0]), dtype=torch.float32, device=device)
    radius = float(rk.get('avg_camera_radius', FFHQ_RADIUS))
    intrinsics = torch.tensor(FFHQ_INTRINSICS, dtype=torch.float32, device=device)
    yaw = (torch.rand([batch_size], device=device) * 2 - 1) * yaw_range
    pitch = (torch.rand([batch_size], device=device) * 2 - 1) * pitch_range
    c1, c2 = [], []
    for d, p in zip(yaw.tolist(), pitch.tolist()):
        for sign, out in [(1, c1), (-1, c2)]:
            pose = LookAtPoseSampler.sample(np.pi / 2 + sign * d, np.pi / 2 + p, pivot, radius=radius, device=device)
            out.append(torch.cat([pose.reshape(16), intrinsics]))
    return torch.stack(c1), torch.stack(c2)

#----------------------------------------------------------------------------


class PersonalizationLoss:
    """Loss terms of one chunk of a batch.

    `__call__` returns (total, terms, per_sample): the mean total, the mean of each term, and the
    total of each sample [N] (per-identity statistics of multi-identity runs).
    """

    def __init__(self, device: torch.device, lpips_net: str = 'alex', arcface: Optional[torch.nn.Module] = None,
                 id_weight: float = 0.0, sym_weight: float = 0.0, density_reg: Optional[float] = None,
                 density_reg_p_dist: Optional[float] = None, filter_mode: str = 'antialiased'):
        """`density_reg` / `density_reg_p_dist`: None = the generator's rendering_kwargs values."""
        self.device = device
        self.density_reg = density_reg
        self.density_reg_p_dist = density_reg_p_dist
        self.lpips = make_lpips(lpips_net, device)
        self.arcface = arcface
        self.id_weight = id_weight
        self.sym_weight = sym_weight
        self.filter_mode = filter_mode
        self.resample_filter = upfirdn2d.setup_filter([1, 3, 3, 1], device=device)
        if (id_weight > 0 or sym_weight > 0) and arcface is None:
            raise ValueError('identity losses need an ArcFace network (--id_model)')

    def density_settings(self, G: torch.nn.Module):
        """(density_reg, density_reg_p_dist): ours if set, else the generator's rendering_kwargs."""
        rk = G.rendering_kwargs
        density_reg = self.density_reg if self.density_reg is not None else rk.get('density_reg', 0)
        p_dist = self.density_reg_p_dist if self.density_reg_p_dist is not None else rk.get('density_reg_p_dist', 0.004)
        return float(density_reg), float(p_dist)

    def has_lazy_terms(self, G: torch.nn.Module) -> bool:
        """Whether lazy-regularisation steps add anything (density or symmetric-view identity)."""
        return self.density_settings(G)[0] > 0 or self.sym_weight > 0

    def __call__(self, G: torch.nn.Module, real_img: torch.Tensor, c: torch.Tensor, ws: torch.Tensor,
                 neural_rendering_resolution: int, regularize: bool = False, reg_gain: float = 1.0):
        """real_img in [-1, 1] [N, 3, R, R]; c [N, 25]; ws [N, num_ws, w_dim].

        `regularize`: this is a lazy-regularisation step: add density and symmetric-view terms
        multiplied by `reg_gain` (the interval, as EG3D's lazy regularisation does).
        """
        terms: Dict[str, torch.Tensor] = {}
        real_raw = filtered_resizing(real_img, size=neural_rendering_resolution, f=self.resample_filter,
                                     filter_mode=self.filter_mode)
        gen = G.synthesis(ws, c, neural_rendering_resolution=neural_rendering_resolution, noise_mode='const')

        # Reconstruction: MSE + LPIPS at both resolutions (My3DGen weights them all 1).
        terms['mse'] = (gen['image'] - real_img).square().mean(dim=[1, 2, 3])
        terms['mse_raw'] = (gen['image_raw'] - real_raw).square().mean(dim=[1, 2, 3])
        if self.lpips is not None:
            terms['lpips'] = lpips_distance(self.lpips, gen['image'], real_img)
            terms['lpips_raw'] = lpips_distance(self.lpips, gen['image_raw'], real_raw)
        total = sum(terms.values())

        if self.id_weight > 0:
            terms['id'] = identity_loss(self.arcface, gen['image'], real_img)
            total = total + self.id_weight * terms['id']

        if regularize and self.sym_weight > 0:
            c1, c2 = mirrored_cameras(G, ws.shape[0], ws.device)
            img1 = G.synthesis(ws, c1, neural_rendering_resolution=neural_rendering_resolution, noise_mode='const')['image']
            img2 = G.synthesis(ws, c2, neural_rendering_resolution=neural_rendering_resolution, noise_mode='const')['image']
            terms['sym_id'] = identity_loss(self.arcface, img1, img2.flip(3))
            total = total + reg_gain * self.sym_weight * terms['sym_id']

        density_reg, p_dist = self.density_settings(G)
        if regularize and density_reg > 0:
            if G.rendering_kwargs.get('reg_type', 'l1') != 'l1':
                raise ValueError(f"density regularisation {G.rendering_kwargs['reg_type']!r} is not supported; "
                                 "use reg_type 'l1'")
            # EG3D: points uniform in [-1, 1]^3, each with a neighbour at N(0, p_dist^2) offset;
            # L1 between their densities, times density_reg.
            points = torch.rand([ws.shape[0], 1000, 3], device=ws.device) * 2 - 1
            perturbed = points + torch.randn_like(points) * p_dist
            all_points = torch.cat([points, perturbed], dim=1)
            sigma = G.sample_mixed(all_points, torch.randn_like(all_points), ws, noise_mode='const')['sigma']
            sigma_initial, sigma_perturbed = sigma[:, :1000], sigma[:, 1000:]
            terms['density'] = (sigma_initial - sigma_perturbed).abs().mean(dim=[1, 2]) * density_reg
            total = total + reg_gain * terms['density']

        terms = {name: value.mean() for name, value in terms.items()}
        return total.mean(), terms, total
