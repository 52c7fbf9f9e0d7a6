"""A run's data: every selfie of every identity with its camera and latent, and the held-out views.

Read once, checked against the generator, and held in memory as tensors (an identity has tens of
selfies); a continued run must see the identities it was trained on.
"""

import dataclasses
from typing import List, Optional

import torch

from training import validation
from training.dataset import IdentitySet
from training.options import TrainingOptions
from training.run_log import RunLog
from training.starting_point import StartingPoint


@dataclasses.dataclass
class RunData:
    training_set: IdentitySet                 # the training views (held-out views removed)
    val_set: Optional[validation.ValidationViews]
    images: torch.Tensor                      # uint8 [N, 3, R, R]
    cameras: torch.Tensor                     # float32 [N, 25]
    latents: torch.Tensor                     # float32 [N, num_ws, w_dim]
    identity_names: List[str]
    record: dict                              # training_set_kwargs as the snapshots record them

    @property
    def num_identities(self) -> int:
        return len(self.identity_names)


def load_run_data(options: TrainingOptions, start: StartingPoint, log: RunLog) -> RunData:
    """Read --data (and the validation views) for the generator of `start`; refuse what cannot train."""
    G = start.G
    kwargs = options.training_set_kwargs
    full_set = IdentitySet(kwargs['path'], resolution=G.img_resolution, num_ws=G.backbone.num_ws, w_dim=G.w_dim,
                           xflip=kwargs.get('xflip', False))
    training_set, val_set = validation.make_views(full_set, options.val_views, options.val_data, G.img_resolution,
                                                  G.backbone.num_ws, G.w_dim)
    identity_names, K = full_set.identity_names, full_set.num_identities
    record = dict(kwargs, class_name='training.dataset.IdentitySet', resolution=training_set.resolution,
                  max_size=len(training_set), use_labels=True, identities=list(identity_names))
    data = RunData(training_set=training_set, val_set=val_set, images=torch.from_numpy(training_set.images),
                   cameras=torch.from_numpy(training_set.cameras), latents=torch.from_numpy(training_set.latents),
                   identity_names=list(identity_names), record=record)
    log(f'Dataset: {len(training_set)} images ({training_set.path}), {training_set.resolution}px, '
        f'latents {list(data.latents.shape[1:])}{", with x-flips" if training_set.xflip else ""}')
    if val_set is not None:
        log(f'Validation: {len(val_set)} views from {val_set.source}, never trained on: {", ".join(val_set.names)}')
    else:
        log('Validation: none (--val-views=0, or under 8 images per identity for the default): no best files, '
            'the last snapshot is the result.')
    if training_set.multi:
        log(f'{K} identities: ' + ', '.join(f'{n} ({s})' for n, s in zip(identity_names, training_set.sizes)))
        if start.adapter_config is None:
            raise ValueError(f'{training_set.path} holds {K} identities: a multi-identity run trains one adapter per '
                             'identity, so it needs adapters (--lora=R); full fine-tuning trains one shared generator')
        if options.batch_size % K != 0:
            log(f'Note: batch {options.batch_size} is not a multiple of the {K} identities; each identity still gets '
                f'the same number of samples over every {K} consecutive samples.')
    if start.continuing:
        recorded = start.progress.get('identities')
        if recorded is not None and list(recorded) != list(identity_names) and (K > 1 or len(recorded) > 1):
            raise ValueError(f'{options.resume_pkl} was trained on the identities {list(recorded)}, but '
                             f'{training_set.path} holds {list(identity_names)}; pass the same --data to continue')
    return data
