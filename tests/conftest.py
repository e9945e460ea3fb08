import importlib
import os
import sys

import pytest
import torch
from helpers import INVARIANT_FAMILIES

from tokenprune.testing import tiny_model

# One thread per test process: the suite runs one pytest-xdist worker per core, and a second torch thread in
# each makes them wait for each other at every op of these tiny models (several times slower, not faster).
torch.set_num_threads(1)

ATTENTION = ["eager", "sdpa"]
try:  # flash-attn runs only on a GPU; its path is tested where it can run.
    import flash_attn  # noqa: F401

    if torch.cuda.is_available():
        ATTENTION.append("flash_attention_2")
except ImportError:
    pass


@pytest.fixture(scope="session", params=ATTENTION)
def attn(request) -> str:
    return request.param


_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def shared_model(family: str, attn: str) -> torch.nn.Module:
    if (family, attn) not in _MODELS:
        _MODELS[family, attn] = tiny_model(family, attn_implementation=attn)
    return _MODELS[family, attn]


@pytest.fixture
def model(attn):
    """The tiny LLaVA for ``attn``, shared by the session; the test must leave it unpatched."""
    m = shared_model("llava", attn)
    yield m
    assert not hasattr(m, "_tokenprune_pruner"), "test left a pruner on the shared model"


@pytest.fixture(params=INVARIANT_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def any_model(family, attn):
    """The tiny model of ``family`` for ``attn`` (every VLM family), shared; left unpatched by the test."""
    m = shared_model(family, attn)
    yield m
    assert not hasattr(m, "_tokenprune_pruner"), "test left a pruner on the shared model"


class _OnGpu:
    """A kernels module whose functions take and return CPU tensors but run compiled on the GPU, so that the
    kernel tests compare the real kernels with the torch references unchanged."""

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name: str):
        fn = getattr(self._module, name)

        def on_gpu(*args, **kwargs):
            moved = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.cuda(), (args, kwargs))
            out = fn(*moved[0], **moved[1])
            return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.cpu(), out)

        return on_gpu


def _forget_triton_modules() -> None:
    """Drop the Triton kernel modules (``triton_kernels`` and those it imports) from ``sys.modules``, so
    that the next import decorates their kernels afresh, in the mode ``TRITON_INTERPRET`` then says."""
    for name in [name for name in sys.modules if name.startswith("tokenprune.kernels.triton_")]:
        del sys.modules[name]


@pytest.fixture
def kernels():
    """The Triton kernels module under the Triton interpreter (``TRITON_INTERPRET=1`` before the kernels
    are decorated), for one test; the dispatcher runs them on CPU tensors meanwhile, and the torch paths
    again after the test (the interpreter runs each kernel program in Python: minutes for a whole
    decode of the tests that do not ask for it). With
    ``TOKENPRUNE_KERNELS=cuda`` (on a GPU machine), the kernels compiled for the GPU instead."""
    if os.environ.get("TOKENPRUNE_KERNELS") == "cuda":
        yield _OnGpu(importlib.import_module("tokenprune.kernels.triton_kernels"))
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    _forget_triton_modules()  # decorate the kernels in interpreter mode
    module = importlib.import_module("tokenprune.kernels.triton_kernels")
    yield module
    _forget_triton_modules()
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous
