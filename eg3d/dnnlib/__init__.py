"""Small utilities shared by the whole code base (same names as the official `dnnlib`)."""

from .util import EasyDict, make_cache_dir_path

__all__ = ['EasyDict', 'make_cache_dir_path']
