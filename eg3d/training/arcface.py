"""ArcFace IR-SE50 face-recognition backbone, for the identity losses of personalization training.

The module tree (and so the state-dict keys) follows the widely used `model_ir_se50.pth`
checkpoint (InsightFace_Pytorch / pSp / MyStyle / My3DGen): `input_layer`, 24 `body` units
(3, 4, 14, 3 at depths 64, 128, 256, 512), each `shortcut_layer` + `res_layer` with a
squeeze-and-excitation tail, and `output_layer` (BN, dropout, flatten, linear 512*7*7 -> 512, BN).
Input: RGB in [-1, 1], 112x112. Output: L2-normalised 512-d embedding.
"""

import os

import torch
from torch import nn


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class _SqueezeExcite(nn.Module):
    """Channel gate: sigmoid(fc2(relu(fc1(avgpool(x))))) * x, fcs as bias-free 1x1 convs."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class _UnitIRSE(nn.Module):
    """Improved residual unit with SE: BN-conv3x3-PReLU-conv3x3(stride)-BN-SE, plus shortcut."""

    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            _SqueezeExcite(depth, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSE50(nn.Module):
    """ArcFace IR-SE50 for 112x112 inputs; `load(path)` reads the standard `model_ir_se50.pth`."""

    STAGES = [(64, 3), (128, 4), (256, 14), (512, 3)]  # (depth, units); first unit of a stage strides 2

    def __init__(self, drop_ratio: float = 0.6):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        units, in_channels = [], 64
        for depth, count in self.STAGES:
            for i in range(count):
                units.append(_UnitIRSE(in_channels, depth, 2 if i == 0 else 1))
                in_channels = depth
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(drop_ratio), _Flatten(),
                                          nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.output_layer(self.body(self.input_layer(x)))
        return torch.nn.functional.normalize(x, dim=1)

    @classmethod
    def load(cls, path: str, device: torch.device = torch.device('cpu')) -> 'IRSE50':
        """Frozen, eval-mode network with the weights of `path` (a state dict, as `model_ir_se50.pth`)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f'--id_model: {path!r} does not exist; pass the ArcFace IR-SE50 weights '
                                    '(model_ir_se50.pth, as used by pSp / MyStyle / My3DGen)')
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as err:
            raise ValueError(f'--id_model: cannot read {path!r} as a PyTorch state dict ({err})') from err
        if isinstance(state, dict) and 'state_dict' in state and isinstance(state['state_dict'], dict):
            state = state['state_dict']
        if not isinstance(state, dict):
            raise ValueError(f'--id_model: {path!r} holds a {type(state).__name__}, not a state dict')
        state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
        net = cls()
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f'--id_model: {path!r} does not match IR-SE50 ({err})') from err
        if missing or unexpected:
            raise ValueError(f'--id_model: {path!r} is not an IR-SE50 state dict '
                             f'(missing {len(missing)} keys, e.g. {missing[:3]}; unexpected {len(unexpected)}, '
                             f'e.g. {unexpected[:3]})')
        return net.eval().requires_grad_(False).to(device)
