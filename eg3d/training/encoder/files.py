"""Encoder files: the encoder's weights and its start latent as safetensors, with its config and the base's fingerprint.

Tensors: the encoder's state dict under `encoder.<name>`, and `w_avg` [num_ws, w_dim] (the ReStyle start).
String metadata: `format` 'pt', `eg3d_encoder_version`, `encoder_config` (EncoderConfig JSON),
`training` (JSON: iterations, neural rendering resolution, kimg, ...), `base_fingerprint` (JSON, as
adapter files: class, init kwargs, sha256 of the generator's weights). An encoder inverts into the W+
of the generator it was trained on, so loading it for another generator is refused.
"""

import json
import os
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize_safetensors

import dnnlib
from training.adapters.files import fingerprint
from training.encoder.networks import EncoderConfig, W3DEncoder

FORMAT_VERSION = '1'


class EncoderFileError(ValueError):
    """An encoder file that cannot be read, or that was made for another generator."""


def save(path: str, encoder: W3DEncoder, w_avg: torch.Tensor, G: torch.nn.Module,
         training: Optional[Dict[str, Any]] = None) -> None:
    """Write `encoder` and its start latent to `path` (a temp file, then renamed), tied to generator G."""
    tensors = {f'encoder.{k}': v.detach().to('cpu').contiguous().clone() for k, v in encoder.state_dict().items()}
    shape = (encoder.config.num_ws, encoder.config.w_dim)
    tensors['w_avg'] = w_avg.detach().to('cpu', torch.float32).reshape(shape).clone()
    metadata = {
        'format': 'pt',
        'eg3d_encoder_version': FORMAT_VERSION,
        'encoder_config': encoder.config.to_json(),
        'training': json.dumps(training or {}, sort_keys=True),
        'base_fingerprint': json.dumps(fingerprint(G), sort_keys=True),
    }
    with dnnlib.util.atomic_write_path(path) as tmp:
        with open(tmp, 'wb') as file:  # written with open(): safetensors' save_file makes 0600 files
            file.write(serialize_safetensors(tensors, metadata=metadata))


def read(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(metadata with JSON fields decoded, tensors) of an encoder file; EncoderFileError naming the file otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EncoderFileError(f'encoder file not found: {path}')
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise EncoderFileError(f'{path} is not a readable safetensors file: {err}') from err
    for key in ('encoder_config', 'base_fingerprint', 'training'):
        if key not in metadata:
            raise EncoderFileError(f'{path} is not an EG3D encoder file (metadata "{key}" missing; '
                                   'train_encoder.py writes encoder-<kimg>.safetensors)')
    for key in ('base_fingerprint', 'training'):
        metadata[key] = json.loads(metadata[key])
    metadata['encoder_config'] = EncoderConfig.from_json(metadata['encoder_config'])
    return metadata, tensors


def check_base(path: str, expected: Dict[str, Any], G: torch.nn.Module) -> None:
    """Refuse a generator other than the one the encoder in `path` was trained on."""
    actual = fingerprint(G)
    for key, what in (('class_name', 'class'), ('init_kwargs', 'constructor arguments'),
                      ('num_params', 'parameter count'), ('weights_sha256', 'weights')):
        if expected.get(key) != actual.get(key):
            raise EncoderFileError(
                f'{path}: this encoder was trained on a different generator (the {what} differ: the file expects '
                f'{expected.get("class_name")} with {expected.get("num_params")} parameters, weights sha256 '
                f'{str(expected.get("weights_sha256"))[:12]}..., this one has {actual.get("num_params")}, '
                f'{str(actual.get("weights_sha256"))[:12]}...). Train an encoder for this generator with '
                'train_encoder.py --network=<its pkl>.')


def load(path: str, G: torch.nn.Module, device: torch.device = torch.device('cpu')
         ) -> Tuple[W3DEncoder, torch.Tensor, Dict[str, Any]]:
    """(encoder in eval mode, w_avg [num_ws, w_dim], training info) from `path`, checked against generator G.

    G is the plain base the encoder was trained on (a generator with adapters loaded is accepted: the
    fingerprint leaves adapter tensors out).
    """
    metadata, tensors = read(path)
    check_base(path, metadata['base_fingerprint'], G)
    config = metadata['encoder_config']
    num_ws, w_dim = int(G.backbone.mapping.num_ws), int(G.w_dim)
    if (config.num_ws, config.w_dim) != (num_ws, w_dim):
        raise EncoderFileError(f'{path}: the encoder outputs W+ [{config.num_ws}, {config.w_dim}], the generator '
                               f'takes [{num_ws}, {w_dim}]')
    encoder = W3DEncoder(config)
    state = {k[len('encoder.'):]: v for k, v in tensors.items() if k.startswith('encoder.')}
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise EncoderFileError(f'{path}: its tensors do not fit the encoder its config describes ({err})') from err
    if 'w_avg' not in tensors or tuple(tensors['w_avg'].shape) != (num_ws, w_dim):
        raise EncoderFileError(f'{path}: tensor "w_avg" [{num_ws}, {w_dim}] missing or of another shape')
    return encoder.eval().requires_grad_(False).to(device), tensors['w_avg'].to(device), metadata['training']
