"""An ImageNet ResNet-34 as the encoder's backbone (`EncoderConfig(backbone='resnet34')`), for users who have
torchvision's checkpoint (`resnet34-b627a593.pth`; ReStyle's encoders start from the same network).

The network is torchvision's ResNet-34 without its max-pool and classifier, so that its four stages give the maps
the IR backbone gives (r/2, r/4, r/8, r/16 with 64, 128, 256, 512 channels) and the pyramid and heads are shared:

    stem:   conv 7x7 stride 2 (6 -> 64 channels), norm, ReLU          r/2
    stages: layer1 (3 blocks), layer2 (4), layer3 (6), layer4 (3)      r/2, r/4, r/8, r/16

Its norms are frozen batch norms (ImageNet's statistics and affine, never updated): batches of 1-4 images per GPU
cannot estimate batch statistics. The stem reads 6 channels (photo ++ reconstruction): `load_imagenet` puts
ImageNet's filters on the photo's channels and zeros on the reconstruction's, so that the loaded backbone starts
as ImageNet's features of the photo and training learns what to take from the reconstruction. Inputs are
normalised as ImageNet's (`normalize`).
"""

from typing import Tuple

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

CHANNELS = (64, 128, 256, 512)
BLOCKS = (3, 4, 6, 3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWeightsError(ValueError):
    """A backbone weights file that is missing or does not hold a torchvision ResNet-34."""


def build(in_channels: int = 6) -> Tuple[nn.Sequential, nn.ModuleList]:
    """(stem, stages) of the ResNet-34 backbone, with the default initialisation (load_imagenet fills them)."""
    resnet = torchvision.models.resnet34(weights=None, norm_layer=FrozenBatchNorm2d)
    stem = nn.Sequential(nn.Conv2d(in_channels, CHANNELS[0], 7, 2, 3, bias=False), FrozenBatchNorm2d(CHANNELS[0]),
                         nn.ReLU(inplace=True))
    return stem, nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] with 3k channels (photo ++ reconstruction) -> ImageNet's normalisation per channel."""
    groups = x.shape[1] // 3
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).repeat(groups).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).repeat(groups).view(1, -1, 1, 1)
    return ((x + 1) / 2 - mean) / std


def load_imagenet(stem: nn.Sequential, stages: nn.ModuleList, path: str) -> None:
    """Fill the backbone from torchvision's ResNet-34 checkpoint at `path` (a state dict; read without running code).

    Raises BackboneWeightsError naming the file when it is missing, unreadable or not a ResNet-34."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError as err:
        raise BackboneWeightsError(f'backbone weights not found: {path}') from err
    except Exception as err:  # a pickle with code, a truncated file, not a torch file at all
        raise BackboneWeightsError(f'{path}: not a readable weights file ({type(err).__name__}: {err})') from err
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict) or 'conv1.weight' not in state:
        raise BackboneWeightsError(f'{path}: not a torchvision ResNet state dict (no conv1.weight)')

    conv1 = state['conv1.weight']
    stem_conv = stem[0].weight
    if tuple(conv1.shape) != (CHANNELS[0], 3, 7, 7):
        raise BackboneWeightsError(f'{path}: conv1.weight is {list(conv1.shape)}, a ResNet-34 has [64, 3, 7, 7]')
    wanted = {f'bn1.{k}': v for k, v in stem[1].state_dict().items()}
    for i, stage in enumerate(stages):
        wanted.update({f'layer{i + 1}.{k}': v for k, v in stage.state_dict().items()})
    missing = [k for k in wanted if k not in state]
    if missing:
        raise BackboneWeightsError(f'{path}: not a ResNet-34 checkpoint: {len(missing)} tensors missing '
                                   f'({", ".join(missing[:3])}{", ..." if len(missing) > 3 else ""})')
    wrong = [k for k, v in wanted.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise BackboneWeightsError(f'{path}: not a ResNet-34 checkpoint: {k} is {list(state[k].shape)}, '
                                   f'expected {list(wanted[k].shape)}')

    with torch.no_grad():
        stem_conv.zero_()
        stem_conv[:, :3].copy_(conv1)
        stem[1].load_state_dict({k[len('bn1.'):]: state[k] for k in wanted if k.startswith('bn1.')})
        for i, stage in enumerate(stages):
            prefix = f'layer{i + 1}.'
            stage.load_state_dict({k[len(prefix):]: state[k] for k in wanted if k.startswith(prefix)})
