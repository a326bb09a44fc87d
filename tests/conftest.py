"""Shared test setup: floating-point trouble is an error, seeds are fixed."""

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("dlmin", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("dlmin")


@pytest.fixture(autouse=True)
def _strict_floating_point():
    old = np.seterr(all="raise", under="ignore")
    yield
    np.seterr(**old)


@pytest.fixture
def rng():
    return np.random.default_rng(20261203)
