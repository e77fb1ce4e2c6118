import os

import pytest
import torch

# Deterministic, quiet, CPU-only tests.
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
