"""Low-rank adapters (LoRA / AdaLoRA, multi-identity) for EG3D generators. See docs/adapters.md."""

from training.adapters.config import AdapterConfig
from training.adapters.inject import (format_parameter_table, get_config, inject, is_injected, merge,
                                      num_adapters, parameter_table, select, trainable_parameters)
from training.adapters.files import fingerprint, forget_fingerprint, load, read_config, read_metadata, save
from training.adapters.allocator import RankAllocator, orthogonal_regularization
from training.adapters.registry import AdapterRegistry
