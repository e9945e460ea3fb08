import pytest
import torch

from tokenprune.testing import tiny_model

torch.set_num_threads(2)

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


_MODELS: dict[str, torch.nn.Module] = {}


@pytest.fixture
def model(attn):
    """The tiny LLaVA for ``attn``, shared by the session; the test must leave it unpatched."""
    if attn not in _MODELS:
        _MODELS[attn] = tiny_model("llava", attn_implementation=attn)
    m = _MODELS[attn]
    yield m
    assert not hasattr(m, "_tokenprune_pruner"), "test left a pruner on the shared model"
