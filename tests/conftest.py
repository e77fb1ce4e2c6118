import os

import pytest
import torch

# Deterministic, quiet, CPU-only tests.
os.environ.setdefault("TQDM_DISABLE", "1")
# Tiny tensors: one thread is several times faster than two on the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
