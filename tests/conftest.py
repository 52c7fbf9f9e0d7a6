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
