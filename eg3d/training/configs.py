"""Network configurations of the official EG3D training setups (ffhq, afhq, shapenet).

Plain data only, reproducing what the official `train.py` builds from its command-line defaults,
so that `train.py`, tests and tools construct identical networks:

    G = TriPlaneGenerator(**generator_kwargs('ffhq', resolution=512))
    D = DualDiscriminator(**discriminator_kwargs(resolution=512))

Every function returns a fresh dict (nested dicts included), safe to modify.
"""

import copy

GENERATOR_CLASS = 'training.triplane.TriPlaneGenerator'
DISCRIMINATOR_CLASS = 'training.dual_discriminator.DualDiscriminator'

# Superresolution module per output resolution (the neural rendering runs at 64 or 128).
SUPERRESOLUTION_MODULES = {
    512: 'training.superresolution.SuperresolutionHybrid8XDC',
    256: 'training.superresolution.SuperresolutionHybrid4X',
    128: 'training.superresolution.SuperresolutionHybrid2X',
}

# Per-dataset ray sampling and camera settings.
#   depth_resolution / depth_resolution_importance: coarse / importance samples per ray.
#   ray_start / ray_end: depth range of the coarse samples ('auto' = intersect the box).
#   box_warp: side length of the cube spanned by the tri-planes (1 -> [-0.5, 0.5]^3).
#   avg_camera_radius / avg_camera_pivot: default orbit used by visualisation tools.
#   white_back: composite over a white background (ShapeNet renders).
_FFHQ_RENDERING = {
    'depth_resolution': 48,
    'depth_resolution_importance': 48,
    'ray_start': 2.25,
    'ray_end': 3.3,
    'box_warp': 1,
    'avg_camera_radius': 2.7,
    'avg_camera_pivot': [0, 0, 0.2],
}
DATASET_RENDERING = {
    'ffhq': _FFHQ_RENDERING,
    'afhq': {**_FFHQ_RENDERING, 'avg_camera_pivot': [0, 0, -0.06]},  # FFHQ settings, lower pivot
    'shapenet': {
        'depth_resolution': 64,
        'depth_resolution_importance': 64,
        'ray_start': 0.1,
        'ray_end': 2.6,
        'box_warp': 1.6,
        'white_back': True,
        'avg_camera_radius': 1.7,
        'avg_camera_pivot': [0, 0, 0],
    },
}


def _check_cfg(cfg: str) -> None:
    if cfg not in DATASET_RENDERING:
        raise ValueError(f'Unknown config {cfg!r}; choose one of {sorted(DATASET_RENDERING)}')


def superresolution_module(resolution: int) -> str:
    """Class name of the official superresolution module for an output resolution."""
    if resolution not in SUPERRESOLUTION_MODULES:
        raise ValueError(f'Unsupported resolution {resolution}; supported: {sorted(SUPERRESOLUTION_MODULES)} '
                         '(pass sr_module= to use another superresolution module)')
    return SUPERRESOLUTION_MODULES[resolution]


def rendering_options(cfg: str, resolution: int = 512, *,
                      gen_pose_cond: bool = False,    # condition the mapping network on the camera
                      gpc_reg_prob: float = 0.5,      # camera-swap probability when gen_pose_cond
                      c_scale: float = 1.0,           # multiplier of the generator's camera label
                      sr_noise_mode: str = 'none',    # 'none' or 'random' noise in superresolution
                      density_reg: float = 0.25,      # density regularisation strength
                      density_reg_p_dist: float = 0.004,  # offset of the perturbed points
                      reg_type: str = 'l1',           # density regularisation variant
                      decoder_lr_mul: float = 1.0,    # decoder learning-rate multiplier
                      sr_module: str = None,          # override the superresolution class
                      ) -> dict:
    """`rendering_kwargs` of TriPlaneGenerator for a dataset config ('ffhq', 'afhq', 'shapenet').

    Defaults are the official train.py defaults. Note that the official README trains the
    published FFHQ and AFHQ models with `--gen_pose_cond=True` (c_gen_conditioning_zero False,
    gpc_reg_prob 0.5); train.py itself defaults to False.
    """
    _check_cfg(cfg)
    options = {
        'image_resolution': resolution,
        'disparity_space_sampling': False,
        'clamp_mode': 'softplus',
        'superresolution_module': sr_module if sr_module is not None else superresolution_module(resolution),
        'c_gen_conditioning_zero': not gen_pose_cond,
        'gpc_reg_prob': gpc_reg_prob if gen_pose_cond else None,
        'c_scale': c_scale,
        'superresolution_noise_mode': sr_noise_mode,
        'density_reg': density_reg,
        'density_reg_p_dist': density_reg_p_dist,
        'reg_type': reg_type,
        'decoder_lr_mul': decoder_lr_mul,
        'sr_antialias': True,
    }
    options.update(copy.deepcopy(DATASET_RENDERING[cfg]))
    return options


def generator_kwargs(cfg: str, resolution: int = 512, *,
                     c_dim: int = 25,             # camera label: cam2world (16) + intrinsics (9)
                     img_channels: int = 3,
                     cbase: int = 32768,          # capacity multiplier (channel_base)
                     cmax: int = 512,             # max feature maps (channel_max)
                     map_depth: int = 2,          # mapping network layers
                     g_num_fp16_res: int = 0,     # fp16 resolutions in the backbone
                     sr_num_fp16_res: int = 4,    # fp16 resolutions in the superresolution module
                     **rendering_overrides,       # passed to rendering_options()
                     ) -> dict:
    """Constructor kwargs of TriPlaneGenerator as the official train.py + training loop pass them.

    The backbone uses conv_clamp 256 only when it runs in fp16, like the official script.
    """
    return {
        'z_dim': 512,
        'w_dim': 512,
        'mapping_kwargs': {'num_layers': map_depth},
        'channel_base': cbase,
        'channel_max': cmax,
        'fused_modconv_default': 'inference_only',
        'rendering_kwargs': rendering_options(cfg, resolution, **rendering_overrides),
        'num_fp16_res': g_num_fp16_res,
        'sr_num_fp16_res': sr_num_fp16_res,
        'sr_kwargs': {'channel_base': cbase, 'channel_max': cmax, 'fused_modconv_default': 'inference_only'},
        'conv_clamp': 256 if g_num_fp16_res > 0 else None,
        'c_dim': c_dim,
        'img_resolution': resolution,
        'img_channels': img_channels,
    }


def discriminator_kwargs(resolution: int = 512, *,
                         c_dim: int = 25,
                         img_channels: int = 3,
                         cbase: int = 32768,
                         cmax: int = 512,
                         d_num_fp16_res: int = 4,   # fp16 resolutions in D
                         disc_c_noise: float = 0,   # camera-label noise, in label stddevs
                         freezed: int = 0,          # number of frozen D blocks
                         mbstd_group: int = 4,      # minibatch-std group size
                         ) -> dict:
    """Constructor kwargs of DualDiscriminator as the official train.py + training loop pass them."""
    return {
        'c_dim': c_dim,
        'img_resolution': resolution,
        'img_channels': img_channels,
        'channel_base': cbase,
        'channel_max': cmax,
        'num_fp16_res': d_num_fp16_res,
        'conv_clamp': 256 if d_num_fp16_res > 0 else None,
        'disc_c_noise': disc_c_noise,
        'block_kwargs': {'freeze_layers': freezed},
        'mapping_kwargs': {},
        'epilogue_kwargs': {'mbstd_group_size': mbstd_group},
    }
