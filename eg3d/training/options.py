"""The options of a personalization run: built by train.py, written to training_options.json, read by the loop.

Plain data with the field names EG3D's kwargs dict had (and training_options.json has always recorded),
so a recorded file gives back its options: `TrainingOptions(**json.load(f))`. An unknown name is a
TypeError, never silently dropped.
"""

import dataclasses
from typing import Any, Dict, List, Optional

import dnnlib
from training import recipe as recipes

EG3D_ADAM = dict(lr=0.0025, betas=[0, 0.99], eps=1e-8)  # EG3D's G optimizer


@dataclasses.dataclass
class TrainingOptions:
    """Every option of one run (the same in all its processes)."""

    # Input and output.
    run_dir: str = '.'                        # Output directory.
    training_set_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)  # path, xflip.
    resume_pkl: Optional[str] = None          # Network pickle to start from (official or ours).
    trust_pickle: bool = False                # Allow unsafe (code-executing) pickle loading.
    # Generator and what trains.
    cfg: str = 'ffhq'                         # Rendering options: 'ffhq', 'afhq', 'shapenet' or 'resume'.
    g_num_fp16_res: Optional[int] = None      # None = as in the resume pickle.
    sr_num_fp16_res: Optional[int] = None
    adapter_config: Optional[Dict[str, Any]] = None  # AdapterConfig.to_dict(); None = full fine-tuning.
    freeze_render: bool = False               # Decoder (and renderer) get no gradients.
    mode: str = ''                            # Recorded by train.py ('lora1', 'full', ...): names the run only.
    # Optimizer.
    G_opt_kwargs: Dict[str, Any] = dataclasses.field(default_factory=lambda: dict(EG3D_ADAM))  # Adam's lr, betas, eps
    recipe: Optional[Dict[str, Any]] = None   # recipes.Recipe.to_dict(); None = G_opt_kwargs at a constant rate.
    # Validation.
    val_views: Optional[int] = None           # Views of each identity held out for validation; None = default.
    val_data: Optional[str] = None            # Folder of validation views instead (nothing is held out).
    early_stop: Optional[int] = None          # Stop after this many validations without improvement.
    # Objective.
    loss_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)  # lpips_net, id_model, id_weight, ...
    neural_rendering_resolution: Optional[int] = None  # None = the superresolution module's input size.
    density_reg_every: int = 4                # Lazy regularisation interval (density, symmetric identity).
    # Length and reporting.
    total_kimg: float = 500                   # Training length in thousands of images.
    kimg_per_tick: float = 4                  # Progress report interval.
    network_snapshot_ticks: int = 50          # Snapshot interval in ticks.
    grid_rows: int = 8                        # Samples in the image grids; 0 = no grids.
    progress_bar: bool = True                 # tqdm bar on rank 0.
    # Batch and processes.
    batch_size: int = 4                       # Global batch.
    batch_gpu: int = 4                        # Samples per forward pass per process.
    random_seed: int = 0
    num_gpus: int = 1                         # Number of processes.
    device: str = 'cuda'                      # 'cuda' (process uses cuda:local_rank) or 'cpu'.
    workers: int = 0                          # Accepted for EG3D compatibility; data is in memory.
    cudnn_benchmark: bool = True
    allow_tf32: bool = False                  # TF32 matmuls/convolutions on Ampere+ (faster; off = official numerics).
    metrics: List[str] = dataclasses.field(default_factory=list)  # EG3D's option: none is computed here.

    def __post_init__(self) -> None:
        if self.metrics:
            raise ValueError(f'metrics={list(self.metrics)}: personalization computes no quality metrics during '
                             'training (run evaluate.py on the snapshots)')
        # Own copies (the loop records them in its snapshots; a caller's dicts stay as they were), read
        # as EG3D's were: c.loss_kwargs.lpips_net or c.loss_kwargs['lpips_net'].
        self.training_set_kwargs = dnnlib.EasyDict(self.training_set_kwargs or {})
        self.G_opt_kwargs = dnnlib.EasyDict(self.G_opt_kwargs or EG3D_ADAM)
        self.loss_kwargs = dnnlib.EasyDict(self.loss_kwargs or {})
        self.metrics = list(self.metrics)

    def make_recipe(self) -> recipes.Recipe:
        """The recipe, or (runs that name none) Adam of G_opt_kwargs at a constant rate."""
        if self.recipe is not None:
            return recipes.Recipe.from_dict(self.recipe)
        return recipes.Recipe('constant', lr=self.G_opt_kwargs['lr'], betas=self.G_opt_kwargs['betas'],
                              eps=self.G_opt_kwargs.get('eps', 1e-8))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: the layout of training_options.json."""
        return dataclasses.asdict(self)
