"""Objective of the encoder, summed over the ReStyle iterations of a batch (means over its samples):

  image    ||G(w_i, c) - photo||^2 (pixel mean)                      every iteration
  lpips    LPIPS(G(w_i, c), photo) (at most 256 px)                   if an LPIPS network is given
  id       1 - ArcFace cosine(G(w_i, c), photo)                        if a face embedding is given
  latent   ||w_i - w||^2 (element mean), on the samples whose w is known (generator samples, folders
           with latents)
  mirror   the mirrored photo with its mirrored camera must invert consistently: one iteration from
           w_avg on (flip(photo), mirror(c)), rendered from mirror(c) and flipped back, must match the
           photo (pixel mean squared error); once per batch, after the first iteration. With the encoder's
           confidence head (TriPlaneNet's confidence map), the squared error e of each pixel is weighted by
           1 / sigma, normalised to mean 1 over the image:  sum(e / sigma) / sum(1 / sigma)  (sigma detached)
  confidence the head's loss, the Gaussian negative log-likelihood of the error (times 2, constant dropped):
           mean(e / sigma + log sigma), e detached, so it trains the head alone; it is lowest at sigma = e,
           so pixels whose mirror does not fit (hair parting, one-sided light) get a large sigma, a low weight
  converged E(photo ++ photo, c)^2 (element mean): where the render already is the photo, the residual
           is zero; once per batch. Early in training every iteration's input is near w_avg, so the
           encoder never sees a render that is already right; without this term a briefly trained one
           kept a residual there (in the direction of its first correction), which iterations 2..
           added again and again (they overshot)

Each iteration's terms are backpropagated right away (`backward_scale` times their sum), so only one
iteration's graph through G is alive at a time.
"""

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from training.encoder import restyle
from training.encoder.data import Batch, mirror_cameras
from training.loss import identity_loss, lpips_distance


@dataclasses.dataclass(frozen=True)
class LossWeights:
    image: float = 1.0
    lpips: float = 0.8
    id: float = 0.1
    latent: float = 1.0
    mirror: float = 0.5
    converged: float = 1.0
    confidence: float = 1.0


def confidence_weighted_error(error: torch.Tensor, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample [N] (weighted error, confidence NLL) of squared errors `error` [N, H, W] and the predicted sigma
    [N, H, W] > 0; see the module docstring. The weights have mean 1, so the term keeps the scale of the plain mean."""
    weight = 1 / sigma.detach()
    weighted = (weight * error).sum(dim=[1, 2]) / weight.sum(dim=[1, 2])
    nll = (error.detach() / sigma + sigma.log()).mean(dim=[1, 2])
    return weighted, nll


def latent_loss(ws: torch.Tensor, target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared W+ error [N]; zero where the target latent is unknown."""
    return (ws - target).square().mean(dim=[1, 2]) * known.to(ws.dtype)


def mirrored_loss(encoder: torch.nn.Module, render: restyle.RenderFn, photo: torch.Tensor, c: torch.Tensor,
                  w_start: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample terms [N]: one iteration from w_start on the mirrored photo and camera, flipped back, vs the photo:
    {'mirror'} (pixel mean squared error), or with a confidence head {'mirror' (weighted), 'confidence'}."""
    c_mirror = mirror_cameras(c)
    photo_mirror = photo.flip(3)
    with torch.no_grad():
        start_image = render(w_start, c_mirror)
    if getattr(encoder, 'confidence', None) is None:
        residual, sigma = encoder(photo_mirror, start_image, c_mirror), None
    else:
        residual, sigma = encoder.forward_with_confidence(photo_mirror, start_image, c_mirror)
    error = (render(w_start + residual, c_mirror).flip(3) - photo).square().mean(dim=1)  # [N, H, W]
    if sigma is None:
        return {'mirror': error.mean(dim=[1, 2])}
    sigma = F.interpolate(sigma.flip(3), size=error.shape[-2:], mode='bilinear', align_corners=False)[:, 0]
    weighted, nll = confidence_weighted_error(error, sigma)
    return {'mirror': weighted, 'confidence': nll}


def converged_loss(encoder: torch.nn.Module, photo: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per-sample [N] mean squared residual the encoder predicts when the current render is the photo itself."""
    return encoder(photo, photo, c).square().mean(dim=[1, 2])


class EncoderLoss:
    """Runs the ReStyle iterations of one batch with their losses and backward passes; returns the term means."""

    def __init__(self, weights: LossWeights, lpips_module: Optional[torch.nn.Module] = None,
                 arcface: Optional[torch.nn.Module] = None):
        self.weights = weights
        self.lpips = lpips_module
        self.arcface = arcface

    @property
    def needs_image_gradient(self) -> bool:
        w = self.weights
        return w.image > 0 or (w.lpips > 0 and self.lpips is not None) or (w.id > 0 and self.arcface is not None)

    def image_terms(self, image: torch.Tensor, photo: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-sample reconstruction terms [N] of the renders against the photos (unweighted)."""
        terms = {'image': (image - photo).square().mean(dim=[1, 2, 3])}
        if self.lpips is not None:
            terms['lpips'] = lpips_distance(self.lpips, _at_most_256(image), _at_most_256(photo))
        if self.arcface is not None:
            terms['id'] = identity_loss(self.arcface, image, photo)
        return terms

    def __call__(self, encoder: torch.nn.Module, render: restyle.RenderFn, batch: Batch, w_start: torch.Tensor,
                 iters: int, backward_scale: float = 1.0) -> Tuple[Dict[str, float], List[restyle.Iteration]]:
        """Sum of the weighted terms over `iters` iterations, backpropagated.

        Returns ({term: mean over the iterations that have it}, the start and every iteration's detached latent
        and render). Without an image term to train, the last iteration is not rendered (nothing reads it), and
        the logged image error is that of iterations 1..iters-1.
        """
        sums: Dict[str, List[float]] = {}
        grad_render = render if self.needs_image_gradient else _without_grad(render)

        def on_iteration(i: int, it: restyle.Iteration) -> None:
            terms = {}
            if it.image is not None:
                terms = self.image_terms(it.image, batch.images) if self.needs_image_gradient else \
                    {'image': (it.image - batch.images).square().mean(dim=[1, 2, 3])}
            terms['latent'] = latent_loss(it.ws, batch.ws, batch.has_ws)
            if i == 1 and self.weights.mirror > 0:
                terms.update(mirrored_loss(encoder, render, batch.images, batch.cameras, w_start))
            if i == 1 and self.weights.converged > 0:
                terms['converged'] = converged_loss(encoder, batch.images, batch.cameras)
            total = sum(getattr(self.weights, name) * value.mean() for name, value in terms.items()
                        if value.requires_grad)
            if torch.is_tensor(total):
                (total * backward_scale / iters).backward()
            for name, value in terms.items():
                acc = sums.setdefault(name, [0.0, 0])
                acc[0] += float(value.detach().mean())
                acc[1] += 1

        states = restyle.refine(encoder, grad_render, batch.images, batch.cameras, w_start, iters,
                                on_iteration=on_iteration, render_last=self.needs_image_gradient)
        return {name: total / count for name, (total, count) in sums.items()}, states


def _without_grad(render: restyle.RenderFn) -> restyle.RenderFn:
    def wrapped(ws: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return render(ws, c)
    return wrapped


def _at_most_256(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(256, 256), mode='area') if x.shape[-1] > 256 else x
