"""Fixtures shared by the training tests."""
import pytest

import dnnlib
from training import synthetic_identity as si


@pytest.fixture(scope='session')
def identity8(tmp_path_factory) -> dnnlib.EasyDict:
    """Eight views of a synthetic person and its tiny base: one view is held out by the default --val-views."""
    return si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'synthetic-identity-8'), views=8, heldout=0,
                              strength=0.3)
