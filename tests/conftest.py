import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. It must be set
# before any Triton kernel is defined; genkern imports its Triton modules lazily, so here is early enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

# Tests compare against float64 references: no TF32 in the convolutions and matmuls of the test models
# (cuDNN uses it by default, and its rounding, 1e-3 relative, differs between layouts and algorithms).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
