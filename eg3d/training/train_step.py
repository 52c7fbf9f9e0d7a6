"""One training step: the global batch -> G.synthesis -> loss -> adapter gradients -> all-reduce -> Adam.

A step takes the whole --batch, or, for a recipe with images_per_step, that many images of each identity
(recipe.step_batch): `batch_size` and `batch_gpu` here are the step's.

    indices of the global batch (balanced over identities) -> this process's chunks:
        each chunk: select its identities' adapters, seed the RNG (chunk_seed), loss, backward
    (AdaLoRA: orthogonality of P and Q) -> gradients summed over processes (NaN/inf counted, replaced)
    -> (clip) -> Adam at the recipe's rate
    -> (step search: the same chunks forward again at the new parameters, the step rescaled; step_search.py)
    -> (AdaLoRA: budget and masks)

Randomness is a pure function of (random_seed, step, chunk), so the result does not depend on how
chunks are spread over processes. With K identities the batch loss is multiplied by K: an adapter
gets gradients only from its identity's B / K samples, exactly the gradient of a single-identity run
with batch B / K (the scale matters: Adam's eps is not scale-free).
"""

from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from torch_utils import misc
from training import adapters, step_search
from training import recipe as recipes
from training.adapters.inject import adapter_layers
from training.loss import PersonalizationLoss
from training.options import TrainingOptions
from training.run_data import RunData
from training.tick_stats import TickStats
from training.trainables import Trainables


def chunk_seed(random_seed: int, step: int, chunk: int) -> int:
    """Seed of the global RNG for chunk `chunk` of training step `step`."""
    return int(np.random.SeedSequence([random_seed, step, chunk]).generate_state(1, dtype=np.uint64)[0] >> 1)


def all_reduce_gradients(params: list, num_gpus: int) -> torch.Tensor:
    """Sum gradients over processes (the loss is already scaled to a global-batch mean).

    Returns how many gradient entries were NaN or +-inf (a 0-dim tensor, the same on every process;
    no device sync here). Those entries are then replaced as EG3D does (NaN by 0, +-inf by +-1e5), so
    one bad sample does not destroy the adapters; the training loop reports the count per tick.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    if num_gpus > 1:
        torch.distributed.all_reduce(flat)
    nonfinite = flat.numel() - torch.isfinite(flat).sum()
    misc.nan_to_num(flat, nan=0, posinf=1e5, neginf=-1e5, out=flat)
    for param, piece in zip(params, flat.split([p.numel() for p in params])):
        param.grad = piece.reshape(param.shape)
    return nonfinite


def make_loss(loss_kwargs: dict, device: torch.device) -> PersonalizationLoss:
    """Reconstruction (MSE + LPIPS, two resolutions) + optional identity terms + density regularisation."""
    arcface = None
    if loss_kwargs.get('id_model'):
        from training.arcface import IRSE50
        arcface = IRSE50.load(loss_kwargs['id_model'], device)
    return PersonalizationLoss(device, lpips_net=loss_kwargs.get('lpips_net', 'alex'), arcface=arcface,
                               id_weight=loss_kwargs.get('id_weight', 0.0),
                               sym_weight=loss_kwargs.get('sym_weight', 0.0),
                               density_reg=loss_kwargs.get('density_reg'),
                               density_reg_p_dist=loss_kwargs.get('density_reg_p_dist'))


class TrainingStep:
    """`step(step, cur_nimg)` runs training step `step` in this process and adds its statistics to `tick`."""

    def __init__(self, G: torch.nn.Module, data: RunData, trainables: Trainables, loss_fn: PersonalizationLoss,
                 recipe: recipes.Recipe, options: TrainingOptions, random_seed: int, neural_rendering_resolution: int,
                 rank: int, device: torch.device, tick: TickStats):
        self.G, self.data, self.trainables, self.loss_fn, self.recipe = G, data, trainables, loss_fn, recipe
        self.options, self.random_seed, self.rank, self.device, self.tick = options, random_seed, rank, device, tick
        self.neural_rendering_resolution = neural_rendering_resolution
        self.lazy_reg = loss_fn.has_lazy_terms(G) and options.density_reg_every > 0
        self.total_nimg = int(round(options.total_kimg * 1000))
        self.batch_size, self.batch_gpu = recipes.step_batch(recipe, options.batch_size, options.batch_gpu,
                                                             data.num_identities, options.num_gpus)
        # With several identities, each adapter's step gets its own search, when every trained tensor holds one
        # slot per identity and no term couples them (AdaLoRA's orthogonality is a mean over all slots).
        adapter_ids = {id(p) for _, layer in adapter_layers(G) for p in layer.adapter_parameters()}
        self.search_per_identity = (recipe.step_search is not None and data.num_identities > 1 and
                                    trainables.allocator is None and
                                    all(id(p) in adapter_ids for p in trainables.params))

    def __call__(self, step: int, cur_nimg: int) -> float:
        """Returns the learning rate of the step."""
        o, trainables = self.options, self.trainables
        K = self.data.num_identities
        trainables.optimizer.zero_grad(set_to_none=True)
        lr = recipes.set_learning_rate(trainables.optimizer, self.recipe, cur_nimg, self.total_nimg)
        terms, identity_losses = self._backward_loss(step, self.tick)
        if trainables.allocator is not None:  # AdaLoRA: orthogonality of P and Q, once per step over all processes.
            orth = adapters.orthogonal_regularization(self.G) * trainables.config.orth_reg_weight  # mean over adapters
            (orth * (K / o.num_gpus)).backward()
            terms['orth'] = float(orth.detach()) / o.num_gpus
            terms['total'] += float(orth.detach()) / o.num_gpus

        nonfinite = all_reduce_gradients(trainables.params, o.num_gpus)
        searched = self.recipe.step_search is not None
        if searched:  # the start and the true gradient (before clipping) of the line the search looks along
            before = [p.detach().clone() for p in trainables.params]
            grads = [p.grad.detach().clone() for p in trainables.params]
        recipes.clip_gradients(trainables.params, self.recipe)
        trainables.optimizer.step()
        if searched and self.search_per_identity:
            factors = step_search.rescale_step_per_slot(trainables.params, before, grads,
                                                        self._sum_over_processes(identity_losses),
                                                        lambda: self._identity_losses_after_step(step),
                                                        self.recipe.step_search)
            terms['step_factor'] = float(factors.mean()) / o.num_gpus  # every process adds its share
        elif searched:
            factor = step_search.rescale_step(trainables.params, before, grads, self._global_loss(terms['total']),
                                              lambda: self._loss_after_step(step), self.recipe.step_search)
            terms['step_factor'] = factor / o.num_gpus  # every process adds its share, as for the loss terms
        if trainables.allocator is not None:
            trainables.allocator.update_and_mask(self.G, step)
        self.tick.add_step(terms, nonfinite)
        return lr

    def loss_gradients(self, step: int) -> None:
        """The gradients of step `step`'s loss on its batch, summed over processes, in the trainable tensors'
        .grad; no optimizer step and no statistics (what the gradient-aligned initialisation reads)."""
        self.trainables.optimizer.zero_grad(set_to_none=True)
        self._backward_loss(step, tick=None)  # the loss values are not needed
        all_reduce_gradients(self.trainables.params, self.options.num_gpus)

    def _backward_loss(self, step: int, tick: Optional[TickStats]) -> Tuple[dict, torch.Tensor]:
        """Backward of this process's chunks of step `step`'s batch; returns the loss terms (global-batch means)
        and this process's share of each identity's loss [K], as the gradient sees it."""
        share, K = self.batch_gpu / self.batch_size, self.data.num_identities
        terms: dict = {}
        identity_losses = torch.zeros(K, dtype=torch.float64, device=self.device)
        for identity, total, chunk_terms, per_sample in self._chunk_losses(step):
            (total * (share * K)).backward()
            for name, value in [('total', total)] + list(chunk_terms.items()):
                terms[name] = terms.get(name, 0.0) + float(value.detach()) * share
            self._add_identity_losses(identity_losses, identity, per_sample)
            if tick is not None:
                tick.add_samples(identity, per_sample)
        return terms, identity_losses

    def _add_identity_losses(self, identity_losses: torch.Tensor, identity: np.ndarray, per_sample: torch.Tensor):
        """Each sample's loss, weighted as in the batch loss the gradient sees (K / batch), into its identity's."""
        weight = self.data.num_identities / self.batch_size
        identity_losses.index_add_(0, torch.from_numpy(identity).to(self.device),
                                   per_sample.detach().to(torch.float64) * weight)

    def _sum_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        if self.options.num_gpus > 1:
            torch.distributed.all_reduce(values)
        return values

    def _chunk_losses(self, step: int) -> Iterator[Tuple[np.ndarray, torch.Tensor, dict, torch.Tensor]]:
        """(identities, loss, loss terms, per-sample loss) of each of this process's chunks of step `step`'s batch,
        with the chunk's RNG seed: evaluating a step twice renders the same rays."""
        o, data, batch_gpu = self.options, self.data, self.batch_gpu
        indices = torch.from_numpy(data.training_set.batch_indices(self.batch_size, step, self.random_seed))
        regularize = self.lazy_reg and step % o.density_reg_every == 0
        for chunk in range(self.rank, self.batch_size // batch_gpu, o.num_gpus):
            idx = indices[chunk * batch_gpu:(chunk + 1) * batch_gpu]
            real_img = data.images[idx].to(self.device).to(torch.float32) / 127.5 - 1
            c, ws = data.cameras[idx].to(self.device), data.latents[idx].to(self.device)
            identity = data.training_set.identity[idx.numpy()]
            if self.trainables.config is not None:
                adapters.select(self.G, torch.from_numpy(identity))
            torch.manual_seed(chunk_seed(self.random_seed, step, chunk))
            yield (identity, *self.loss_fn(self.G, real_img, c, ws, self.neural_rendering_resolution,
                                           regularize=regularize, reg_gain=o.density_reg_every))

    def _global_loss(self, process_total: float) -> float:
        """The step's loss as its gradient sees it: this process's share of the terms, summed over processes,
        times the number of identities."""
        total = torch.tensor(process_total, dtype=torch.float64, device=self.device)
        if self.options.num_gpus > 1:
            torch.distributed.all_reduce(total)
        return float(total) * self.data.num_identities

    @torch.no_grad()
    def _loss_after_step(self, step: int) -> float:
        """Step `step`'s loss at the current parameters, on the same batch and noise (forward passes only)."""
        share = self.batch_gpu / self.batch_size
        total = sum(float(chunk_total) * share for _, chunk_total, _, _ in self._chunk_losses(step))
        if self.trainables.allocator is not None:
            total += float(adapters.orthogonal_regularization(self.G)) * self.trainables.config.orth_reg_weight / \
                self.options.num_gpus
        return self._global_loss(total)

    @torch.no_grad()
    def _identity_losses_after_step(self, step: int) -> torch.Tensor:
        """Each identity's share of step `step`'s loss [K] at the current parameters, over all processes."""
        identity_losses = torch.zeros(self.data.num_identities, dtype=torch.float64, device=self.device)
        for identity, _, _, per_sample in self._chunk_losses(step):
            self._add_identity_losses(identity_losses, identity, per_sample)
        return self._sum_over_processes(identity_losses)
