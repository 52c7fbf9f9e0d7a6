"""EG3D generator: a StyleGAN2 backbone produces tri-plane features, a small MLP decodes them
into colour features and density, a volume renderer turns them into a low-resolution feature
image, and a superresolution network upsamples its first three channels to the output image.

    z, c --mapping--> ws [N, num_ws, w_dim]
    ws --backbone.synthesis--> planes [N, 96, 256, 256] = 3 planes x 32 channels
    planes, rays(c) --renderer + decoder--> feature image [N, 32, R, R] (first 3 = image_raw)
    image_raw, feature image, ws --superresolution--> image [N, 3, img_resolution, img_resolution]
"""

import torch

import dnnlib
from torch_utils import persistence
from training.networks_stylegan2 import FullyConnectedLayer
from training.networks_stylegan2 import Generator as StyleGAN2Backbone
from training.volumetric_rendering.ray_sampler import RaySampler
from training.volumetric_rendering.renderer import ImportanceRenderer

PLANE_CHANNELS = 32  # channels per tri-plane; the backbone emits 3 * PLANE_CHANNELS
PLANE_RESOLUTION = 256  # the backbone always renders the planes at 256 x 256


@persistence.persistent_class
class TriPlaneGenerator(torch.nn.Module):
    def __init__(self,
        z_dim,                  # Size of the latent z.
        c_dim,                  # Camera label size: 25 = cam2world (16) + intrinsics (9).
        w_dim,                  # Size of each w.
        img_resolution,         # Side of the final (superresolved) image.
        img_channels,           # Channels of the final image.
        sr_num_fp16_res=0,      # > 0: the superresolution blocks run in float16 (CUDA).
        mapping_kwargs={},      # Forwarded to the backbone's MappingNetwork.
        rendering_kwargs={},    # Renderer / conditioning options (see training.configs.rendering_options).
        sr_kwargs={},           # Forwarded to the superresolution module.
        **synthesis_kwargs,     # Forwarded to the backbone's SynthesisNetwork.
    ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.renderer = ImportanceRenderer()
        self.ray_sampler = RaySampler()
        self.backbone = StyleGAN2Backbone(z_dim, c_dim, w_dim, img_resolution=PLANE_RESOLUTION, img_channels=3 * PLANE_CHANNELS,
                                          mapping_kwargs=mapping_kwargs, **synthesis_kwargs)
        self.superresolution = dnnlib.util.construct_class_by_name(class_name=rendering_kwargs['superresolution_module'],
                                                                   channels=PLANE_CHANNELS, img_resolution=img_resolution,
                                                                   sr_num_fp16_res=sr_num_fp16_res,
                                                                   sr_antialias=rendering_kwargs['sr_antialias'], **sr_kwargs)
        self.decoder = OSGDecoder(PLANE_CHANNELS, {'decoder_lr_mul': rendering_kwargs.get('decoder_lr_mul', 1),
                                                   'decoder_output_dim': PLANE_CHANNELS})
        self.neural_rendering_resolution = 64
        self.rendering_kwargs = rendering_kwargs
        self._last_planes = None

    def mapping(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False):
        """z [N, z_dim], c [N, c_dim] -> ws [N, num_ws, w_dim].

        With `c_gen_conditioning_zero` the mapping sees zeros instead of the camera. The label is
        scaled by `c_scale`; as in the official code a missing `c_scale` means 0.
        """
        if self.rendering_kwargs['c_gen_conditioning_zero']:
            c = torch.zeros_like(c)
        return self.backbone.mapping(z, c * self.rendering_kwargs.get('c_scale', 0), truncation_psi=truncation_psi,
                                     truncation_cutoff=truncation_cutoff, update_emas=update_emas)

    def _planes(self, ws, update_emas=False, **synthesis_kwargs):
        """Backbone output [N, 96, 256, 256] viewed as three 32-channel planes [N, 3, 32, 256, 256]."""
        planes = self.backbone.synthesis(ws, update_emas=update_emas, **synthesis_kwargs)
        return self._split_planes(planes)

    @staticmethod
    def _split_planes(planes):
        return planes.view(len(planes), 3, PLANE_CHANNELS, planes.shape[-2], planes.shape[-1])

    def synthesis(self, ws, c, neural_rendering_resolution=None, update_emas=False, cache_backbone=False, use_cached_backbone=False, **synthesis_kwargs):
        """Render ws [N, num_ws, w_dim] from cameras c [N, 25].

        Returns {'image': [N, 3, img_res, img_res], 'image_raw': [N, 3, R, R], 'image_depth': [N, 1, R, R]}
        with R = neural_rendering_resolution (remembered in `self.neural_rendering_resolution`).
        `cache_backbone` stores the planes in `_last_planes`; `use_cached_backbone` reuses them.
        """
        res = self.neural_rendering_resolution if neural_rendering_resolution is None else neural_rendering_resolution
        self.neural_rendering_resolution = res  # an explicit resolution is remembered for later calls
        cam2world = c[:, :16].view(-1, 4, 4)
        intrinsics = c[:, 16:25].view(-1, 3, 3)
        ray_origins, ray_directions = self.ray_sampler(cam2world, intrinsics, res)

        if use_cached_backbone and self._last_planes is not None:
            backbone_out = self._last_planes
        else:
            backbone_out = self.backbone.synthesis(ws, update_emas=update_emas, **synthesis_kwargs)
        if cache_backbone:
            self._last_planes = backbone_out
        features, depths, _ = self.renderer(self._split_planes(backbone_out), self.decoder, ray_origins,
                                            ray_directions, self.rendering_kwargs)

        # Rays come in row-major pixel order: [N, R*R, C] -> [N, C, R, R].
        batch = ray_origins.shape[0]
        feature_image = features.permute(0, 2, 1).reshape(batch, features.shape[-1], res, res).contiguous()
        depth_image = depths.permute(0, 2, 1).reshape(batch, 1, res, res)

        image_raw = feature_image[:, :3]
        sr_kwargs = {k: v for k, v in synthesis_kwargs.items() if k != 'noise_mode'}
        image = self.superresolution(image_raw, feature_image, ws,
                                     noise_mode=self.rendering_kwargs['superresolution_noise_mode'], **sr_kwargs)
        return {'image': image, 'image_raw': image_raw, 'image_depth': depth_image}

    def sample(self, coordinates, directions, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False, **synthesis_kwargs):
        """Density and colour features at arbitrary points [N, K, 3] for latents z (e.g. for shape extraction)."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff, update_emas=update_emas)
        return self.sample_mixed(coordinates, directions, ws, update_emas=update_emas, **synthesis_kwargs)

    def sample_mixed(self, coordinates, directions, ws, truncation_psi=1, truncation_cutoff=None, update_emas=False, **synthesis_kwargs):
        """Like `sample`, from ws directly -> {'rgb': [N, K, 32], 'sigma': [N, K, 1]}.

        `truncation_psi`/`truncation_cutoff` are accepted for signature compatibility and unused.
        """
        planes = self._planes(ws, update_emas=update_emas, **synthesis_kwargs)
        return self.renderer.run_model(planes, self.decoder, coordinates, directions, self.rendering_kwargs)

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, neural_rendering_resolution=None, update_emas=False, cache_backbone=False, use_cached_backbone=False, **synthesis_kwargs):
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff, update_emas=update_emas)
        return self.synthesis(ws, c, update_emas=update_emas, neural_rendering_resolution=neural_rendering_resolution,
                              cache_backbone=cache_backbone, use_cached_backbone=use_cached_backbone, **synthesis_kwargs)


class OSGDecoder(torch.nn.Module):
    """Per-point MLP: the mean of the three plane features -> density (1) + colour features.

    `net` is Sequential(FullyConnectedLayer, Softplus, FullyConnectedLayer); adapters may replace
    `net[0]` / `net[2]`, so forward only goes through `self.net`.
    """

    def __init__(self, n_features, options):
        super().__init__()
        self.hidden_dim = 64
        lr_mul = options['decoder_lr_mul']
        # Output channel 0 is the density, the rest are colour features.
        self.net = torch.nn.Sequential(
            FullyConnectedLayer(n_features, self.hidden_dim, lr_multiplier=lr_mul),
            torch.nn.Softplus(),
            FullyConnectedLayer(self.hidden_dim, 1 + options['decoder_output_dim'], lr_multiplier=lr_mul))

    def forward(self, sampled_features, ray_directions):
        """sampled_features [N, 3, M, C] -> {'rgb': [N, M, out_dim], 'sigma': [N, M, 1]}; directions are unused."""
        pooled = sampled_features.mean(1)  # average over the three planes
        n, m, ch = pooled.shape
        out = self.net(pooled.view(n * m, ch)).view(n, m, -1)
        # Sigmoid widened slightly beyond [0, 1] (MipNeRF) so the extremes stay reachable.
        rgb = torch.sigmoid(out[..., 1:]) * (1 + 2 * 0.001) - 0.001
        return {'rgb': rgb, 'sigma': out[..., 0:1]}
