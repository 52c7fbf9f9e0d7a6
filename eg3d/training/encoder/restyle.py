"""ReStyle's iterative refinement with the camera-aware encoder.

    w_0 = w_avg (or a latent the caller gives),  y_0 = G(w_0, c)
    w_i = w_{i-1} + E(photo ++ y_{i-1}, c),       y_i = G(w_i, c)        for i = 1..iters

Every step sees the photo and what the current latent renders from the photo's camera, and corrects
the latent by a residual. The renders fed back are detached: each iteration learns its own correction
(ReStyle trains the same way).

At inference the guard (`refine_guarded`, on by default in `encode`) keeps every iteration from making the
render worse: y_i is rendered anyway (it is the next iteration's input), so its error against the photo is
known for free; a residual that raises it is halved and rendered again (a few times at most), and if no
fraction helps the photo's estimate stays where it was.
"""

import dataclasses
from typing import Callable, List, Optional

import torch

RenderFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ws [N, num_ws, w_dim], c [N, 25]) -> [N, 3, R, R]


@dataclasses.dataclass
class Iteration:
    ws: torch.Tensor                 # [N, num_ws, w_dim] after this iteration
    image: Optional[torch.Tensor]    # G(ws, c): [N, 3, R, R]; None for a last iteration left unrendered


def start_latent(w_avg: torch.Tensor, batch_size: int, w_init: Optional[torch.Tensor] = None) -> torch.Tensor:
    """w_0 [N, num_ws, w_dim]: `w_init` (broadcast over the batch) or w_avg ([num_ws, w_dim] or [1, ..]) repeated."""
    start = w_init if w_init is not None else w_avg
    start = start.reshape(-1, *w_avg.shape[-2:]) if start.ndim == 2 else start
    return start.expand(batch_size, -1, -1).detach().clone() if start.shape[0] == 1 else start.detach().clone()


def refine(encoder: torch.nn.Module, render: RenderFn, photo: torch.Tensor, c: torch.Tensor, w_start: torch.Tensor,
           iters: int, start_image: Optional[torch.Tensor] = None,
           on_iteration: Optional[Callable[[int, Iteration], None]] = None,
           render_last: bool = True) -> List[Iteration]:
    """Run `iters` ReStyle iterations from w_start; returns the start (w_0, y_0) and every iteration's latent and
    render (detached): `iters + 1` entries.

    `start_image`: y_0 if the caller has it (else it is rendered). `on_iteration(i, it)` is called after
    iteration i (1-based); training puts its loss and backward pass there, so that the graph of one
    iteration is freed before the next is built. `render_last=False` skips the last render (its image is
    None): no later iteration reads it, so training without an image loss saves one generator pass.
    """
    if iters < 1:
        raise ValueError(f'iters must be >= 1, got {iters}')
    ws = w_start
    with torch.no_grad():
        image = render(ws, c) if start_image is None else start_image
    out = [Iteration(ws=ws.detach(), image=image.detach())]
    for i in range(1, iters + 1):
        ws = ws.detach() + encoder(photo, image.detach(), c)
        image = render(ws, c) if render_last or i < iters else None
        it = Iteration(ws=ws, image=image)
        if on_iteration is not None:
            on_iteration(i, it)
        out.append(Iteration(ws=ws.detach(), image=None if image is None else image.detach()))
    return out


def image_error(image: torch.Tensor, photo: torch.Tensor) -> torch.Tensor:
    """Per-photo mean squared error [N] of renders [N, 3, R, R] against the photos (the projector's MSE term)."""
    return (image.float() - photo.float()).square().mean(dim=[1, 2, 3])


@torch.no_grad()
def refine_guarded(encoder: torch.nn.Module, render: RenderFn, photo: torch.Tensor, c: torch.Tensor,
                   w_start: torch.Tensor, iters: int, max_halvings: int = 3) -> List[Iteration]:
    """`refine` at inference with a monotone guard: the image error against the photo never rises.

    Each photo's residual is tried at step 1, 1/2, .., 1/2**max_halvings; the first step whose render lowers
    the error is taken (a step that helps at once costs nothing over `refine`, each rejected try one render).
    If none helps, the photo's latent and render stay, and its later iterations are skipped: the encoder and
    the renderer are deterministic, so they would only propose the same rejected residual again.
    """
    if iters < 1:
        raise ValueError(f'iters must be >= 1, got {iters}')
    if max_halvings < 0:
        raise ValueError(f'max_halvings must be >= 0, got {max_halvings}')
    ws = w_start.detach().clone()
    image = render(ws, c)
    error = image_error(image, photo)
    out = [Iteration(ws=ws, image=image)]
    moving = torch.arange(len(photo), device=photo.device)       # photos whose last iteration was accepted
    for _ in range(iters):
        ws, image, error = ws.clone(), image.clone(), error.clone()
        pending = moving
        residual = encoder(photo[pending], image[pending], c[pending]) if len(pending) else None
        step = 1.0
        for _ in range(max_halvings + 1):
            if len(pending) == 0:
                break
            trial_ws = ws[pending] + step * residual
            trial_image = render(trial_ws, c[pending])
            trial_error = image_error(trial_image, photo[pending])
            better = trial_error < error[pending]
            taken = pending[better]
            ws[taken], image[taken], error[taken] = trial_ws[better], trial_image[better], trial_error[better]
            pending, residual = pending[~better], residual[~better]
            step /= 2
        moving = moving[~torch.isin(moving, pending)]
        out.append(Iteration(ws=ws, image=image))
    return out


@torch.no_grad()
def encode(G: torch.nn.Module, encoder: torch.nn.Module, w_avg: torch.Tensor, photo: torch.Tensor, c: torch.Tensor,
           iters: int, neural_rendering_resolution: Optional[int] = None, w_init: Optional[torch.Tensor] = None,
           seed: int = 0, guard: bool = True) -> List[Iteration]:
    """Inference: `iters` iterations for photos [N, 3, R, R] in [-1, 1] with cameras [N, 25], from w_avg or `w_init`;
    every render uses the renderer seed `seed` (as the projector's renders). `guard`: never let an iteration
    raise the image error (`refine_guarded`); False gives ReStyle's plain iterations (`refine`)."""
    from training import inference as inf

    def render(ws: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
        return inf.render(G, ws, cams, neural_rendering_resolution, seed=seed).float()
    w_start = start_latent(w_avg, photo.shape[0], w_init)
    if guard:
        return refine_guarded(encoder, render, photo, c, w_start, iters)
    return refine(encoder, render, photo, c, w_start, iters)
