"""The camera-aware W+ encoder (3DpSp): an IR-style backbone with a feature pyramid, one map2style head per W+
layer, and the 25-float camera as a condition. `backbone='resnet34'` puts an ImageNet ResNet-34 in the IR
backbone's place (resnet_backbone.py), for users who have its weights.

    photo [N, 3, R, R] ++ current reconstruction [N, 3, R, R]  --resize-->  [N, 6, r, r]
      --stem + IR stages-->  features at r/4, r/8, r/16  --top-down pyramid (pSp)-->  fine, middle, coarse maps
      --one head per W+ layer: extra 1x1 conv, stride-2 convs down to 1x1, ++ camera embedding, linear-->
      residual [N, num_ws, w_dim]

For training only, a small confidence head reads the fine map and predicts sigma [N, 1, r/4, r/4], the expected
squared error of each pixel of the mirrored reconstruction (TriPlaneNet's confidence map; see loss.py).
Inference (`forward`) never runs it.

As in pSp, the first W+ layers read the coarse map, the next ones the middle map and the rest the fine map.
The residual is added to the current W+ by the ReStyle loop (`restyle.py`); its last layers start at zero,
so an untrained encoder leaves its start latent unchanged.
"""

import dataclasses
import json
import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from training.encoder import resnet_backbone

CAMERA_DIM = 25  # cam2world 4x4 + intrinsics 3x3, as EG3D's labels
BACKBONES = ('ir', 'resnet34')


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shape of an encoder; stored in its file, so that a file rebuilds its network."""
    num_ws: int = 14                   # W+ layers of the generator
    w_dim: int = 512
    input_resolution: int = 256        # photos are resized to this before the backbone
    stem_channels: int = 64
    stage_channels: Tuple[int, ...] = (64, 128, 256, 512)   # IR stages; stages 2..4 feed the pyramid
    stage_blocks: Tuple[int, ...] = (2, 2, 3, 2)            # IR blocks per stage (the first one strides 2)
    pyramid_channels: int = 256        # channels of the pyramid maps and the heads
    camera_channels: int = 64          # width of the camera embedding given to every head
    coarse_layers: int = 3             # W+ layers 0..2 from the coarse map (pSp's split of 18 layers: 3 / 4 / 11)
    middle_layers: int = 4             # then 4 from the middle map, the rest from the fine map
    confidence_channels: int = 0       # width of the mirrored loss's confidence head; 0 = no head (the default,
                                       # so that files written before the head existed load as they were)
    backbone: str = 'ir'               # 'ir' (trained here) or 'resnet34' (torchvision's, for ImageNet weights)

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f'backbone must be one of {", ".join(BACKBONES)}, got {self.backbone!r}')
        if self.backbone == 'resnet34' and (self.stem_channels, tuple(self.stage_channels), tuple(self.stage_blocks)) \
                != (resnet_backbone.CHANNELS[0], resnet_backbone.CHANNELS, resnet_backbone.BLOCKS):
            raise ValueError('backbone=resnet34 has ResNet-34\'s stages: stem_channels=64, stage_channels='
                             f'{resnet_backbone.CHANNELS}, stage_blocks={resnet_backbone.BLOCKS}')
        if len(self.stage_channels) != 4 or len(self.stage_blocks) != 4:
            raise ValueError('an encoder has 4 IR stages: stage_channels and stage_blocks need 4 entries each')
        if self.input_resolution < 32 or self.input_resolution & (self.input_resolution - 1):
            raise ValueError(f'input_resolution must be a power of two >= 32, got {self.input_resolution}')
        if self.confidence_channels < 0:
            raise ValueError(f'confidence_channels must be >= 0 (0 = no confidence head), '
                             f'got {self.confidence_channels}')
        if self.coarse_layers + self.middle_layers > self.num_ws:
            raise ValueError(f'coarse_layers + middle_layers ({self.coarse_layers} + {self.middle_layers}) exceed '
                             f'num_ws={self.num_ws}')

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> 'EncoderConfig':
        data = json.loads(text)
        for key in ('stage_channels', 'stage_blocks'):
            data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def for_generator(cls, num_ws: int, w_dim: int, img_resolution: int, backbone: str = 'ir') -> 'EncoderConfig':
        """The preset for a generator: pSp-like widths at 256 px for FFHQ 512, a narrow net at 64 px for small bases;
        with backbone='resnet34', ResNet-34's stages in the IR stages' place (the pyramid and heads as the preset)."""
        coarse = max(1, round(3 * num_ws / 18))
        middle = max(1, round(4 * num_ws / 18))
        if img_resolution >= 256:
            preset = dict(input_resolution=256)
        else:
            preset = dict(input_resolution=64, stem_channels=16, stage_channels=(16, 32, 64, 96),
                          stage_blocks=(1, 1, 1, 1), pyramid_channels=64, camera_channels=32)
        if backbone == 'resnet34':
            preset.update(stem_channels=resnet_backbone.CHANNELS[0], stage_channels=resnet_backbone.CHANNELS,
                          stage_blocks=resnet_backbone.BLOCKS)
        return cls(num_ws=num_ws, w_dim=w_dim, coarse_layers=coarse, middle_layers=middle, confidence_channels=64,
                   backbone=backbone, **preset)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm: the same in training and inference, and independent of the batch (batches of 1-4 per GPU)."""
    return nn.GroupNorm(min(8, channels), channels)


class IRBlock(nn.Module):
    """Improved residual unit (ArcFace / pSp): norm-conv3x3-PReLU-conv3x3(stride)-norm, plus a shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        if in_channels == out_channels and stride == 1:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          _norm(out_channels))
        self.residual = nn.Sequential(
            _norm(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            _norm(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)

    def extra_repr(self) -> str:
        return f'in_channels={self.in_channels}, out_channels={self.out_channels}, stride={self.stride}'


class Map2Style(nn.Module):
    """One W+ layer from a pyramid map [N, C, s, s]: the extra 1x1 conv (3DpSp), log2(s) stride-2 convs to 1x1,
    then a linear layer on the pooled features concatenated with the camera embedding."""

    def __init__(self, channels: int, spatial: int, camera_channels: int, w_dim: int):
        super().__init__()
        self.spatial = spatial
        layers: List[nn.Module] = [nn.Conv2d(channels, channels, 1), nn.LeakyReLU(0.2)]
        for _ in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(channels, channels, 3, 2, 1), nn.LeakyReLU(0.2)]
        self.convs = nn.Sequential(*layers)
        self.linear = nn.Linear(channels + camera_channels, w_dim)
        nn.init.zeros_(self.linear.weight)  # an untrained head adds nothing: the ReStyle start is kept
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, camera_embedding: torch.Tensor) -> torch.Tensor:
        x = self.convs(x).flatten(1)  # [N, C]
        return self.linear(torch.cat([x, camera_embedding], dim=1))

    def extra_repr(self) -> str:
        return f'spatial={self.spatial}'


class ConfidenceHead(nn.Module):
    """Fine pyramid map [N, C, s, s] -> sigma [N, 1, s, s] > 0: the expected squared error of each pixel of the
    mirrored reconstruction (large where the face is not symmetric: hair parting, one-sided light)."""

    SIGMA_MIN = 1e-4  # keeps the weight 1 / sigma finite

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.convs = nn.Sequential(nn.Conv2d(channels, hidden, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(hidden, 1, 1))
        nn.init.zeros_(self.convs[-1].weight)  # an untrained head predicts the same sigma everywhere: equal weights
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, fine: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.convs(fine)) + self.SIGMA_MIN

    def extra_repr(self) -> str:
        return f'hidden={self.hidden}'


class W3DEncoder(nn.Module):
    """(photo, current reconstruction, camera) -> W+ residual [N, num_ws, w_dim]. See the module docstring."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        cfg = config
        if cfg.backbone == 'resnet34':
            self.stem, self.stages = resnet_backbone.build()
        else:
            self.stem = nn.Sequential(nn.Conv2d(6, cfg.stem_channels, 3, 1, 1, bias=False), _norm(cfg.stem_channels),
                                      nn.PReLU(cfg.stem_channels))
            stages, in_channels = [], cfg.stem_channels
            for channels, blocks in zip(cfg.stage_channels, cfg.stage_blocks):
                stages.append(nn.Sequential(*[IRBlock(in_channels if i == 0 else channels, channels,
                                                      2 if i == 0 else 1) for i in range(blocks)]))
                in_channels = channels
            self.stages = nn.ModuleList(stages)
        # either backbone: stage outputs at r/2, r/4, r/8, r/16
        p = cfg.pyramid_channels
        self.lateral_fine = nn.Conv2d(cfg.stage_channels[1], p, 1)
        self.lateral_middle = nn.Conv2d(cfg.stage_channels[2], p, 1)
        self.lateral_coarse = nn.Conv2d(cfg.stage_channels[3], p, 1)
        self.camera = nn.Sequential(nn.Linear(CAMERA_DIM, cfg.camera_channels), nn.LeakyReLU(0.2),
                                    nn.Linear(cfg.camera_channels, cfg.camera_channels), nn.LeakyReLU(0.2))
        r = cfg.input_resolution
        spatial = [r // 16] * cfg.coarse_layers + [r // 8] * cfg.middle_layers
        spatial += [r // 4] * (cfg.num_ws - len(spatial))
        self.heads = nn.ModuleList([Map2Style(p, s, cfg.camera_channels, cfg.w_dim) for s in spatial])
        self.confidence = ConfidenceHead(p, cfg.confidence_channels) if cfg.confidence_channels > 0 else None

    def load_backbone_weights(self, path: str) -> None:
        """ImageNet weights (torchvision's ResNet-34 checkpoint) into a resnet34 backbone; see resnet_backbone.py."""
        if self.config.backbone != 'resnet34':
            raise ValueError(f'backbone weights need backbone=resnet34; this encoder\'s is {self.config.backbone}')
        resnet_backbone.load_imagenet(self.stem, self.stages, path)

    def pyramid(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Backbone + top-down pathway: {'coarse': r/16, 'middle': r/8, 'fine': r/4} maps of pyramid_channels."""
        features = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        coarse = self.lateral_coarse(features[3])
        middle = F.interpolate(coarse, scale_factor=2, mode='bilinear', align_corners=False) + \
            self.lateral_middle(features[2])
        fine = F.interpolate(middle, scale_factor=2, mode='bilinear', align_corners=False) + \
            self.lateral_fine(features[1])
        return {'coarse': coarse, 'middle': middle, 'fine': fine}

    def forward(self, photo: torch.Tensor, reconstruction: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """photo, reconstruction [N, 3, R, R] in [-1, 1] (any R; resized), c [N, 25] -> residual [N, num_ws, w_dim]."""
        return self._residual(self.pyramid(self._input(photo, reconstruction)), c)

    def forward_with_confidence(self, photo: torch.Tensor, reconstruction: torch.Tensor, c: torch.Tensor
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(residual as `forward`, sigma [N, 1, r/4, r/4] of the confidence head); training's mirrored loss only.

        The head reads the fine map detached: its loss trains the head, never the features the inversion uses.
        """
        if self.confidence is None:
            raise ValueError('this encoder has no confidence head (its config has confidence_channels=0)')
        maps = self.pyramid(self._input(photo, reconstruction))
        return self._residual(maps, c), self.confidence(maps['fine'].detach())

    def _input(self, photo: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        r = self.config.input_resolution
        x = torch.cat([photo, reconstruction], dim=1)
        if x.shape[-1] != r or x.shape[-2] != r:
            mode = 'area' if x.shape[-1] > r else 'bilinear'
            x = F.interpolate(x, size=(r, r), mode=mode, **({} if mode == 'area' else {'align_corners': False}))
        return resnet_backbone.normalize(x) if self.config.backbone == 'resnet34' else x

    def _residual(self, maps: Dict[str, torch.Tensor], c: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        embedding = self.camera(c.to(maps['fine'].dtype))
        levels = ['coarse'] * cfg.coarse_layers + ['middle'] * cfg.middle_layers
        levels += ['fine'] * (cfg.num_ws - len(levels))
        return torch.stack([head(maps[level], embedding) for head, level in zip(self.heads, levels)], dim=1)
