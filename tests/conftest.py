"""Shared test setup: make the `eg3d/` code importable and locate the golden data."""
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EG3D_DIR = REPO_ROOT / "eg3d"
GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden"

if str(EG3D_DIR) not in sys.path:
    sys.path.insert(0, str(EG3D_DIR))



@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def tiny_identity(tmp_path_factory) -> Path:
    """A small synthetic identity (train/: 3 selfies, heldout/: 2) and its tiny base.pkl, written once per session."""
    from training import synthetic_identity
    root = tmp_path_factory.mktemp("synthetic_identity")
    synthetic_identity.write_identity(str(root), views=3, heldout=2)
    return root
