"""Triton kernels under the interpreter on the CPU, against their torch references.

The interpreter is switched on for this module only (the ``kernels`` fixture of conftest.py); elsewhere in
the suite the dispatcher picks the torch reference on the CPU.
"""

import pytest
import torch

from tokenprune.context import SelectionContext
from tokenprune.kernels import dpp, greedy, use_triton
from tokenprune.kernels import gather as reference
from tokenprune.methods._select import cosine_similarity_matrix, min_max
from tokenprune.registry import get_method

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ragged_plan(batch: int, length: int, keep: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``index [B, L']`` and ``valid`` for rows keeping ``keep[b]`` random tokens each."""
    g = torch.Generator().manual_seed(seed)
    out_len = max(keep)
    index = torch.zeros(batch, out_len, dtype=torch.long)
    valid = torch.zeros(batch, out_len, dtype=torch.bool)
    for b, k in enumerate(keep):
        rows = torch.randperm(length, generator=g)[:k].sort().values
        index[b, out_len - k :] = rows
        valid[b, out_len - k :] = True
    return index, valid


CASES = {
    "batch1": (1, 20, [7]),
    "ragged": (3, 20, [5, 12, 1]),
    "keep-all": (2, 20, [20, 20]),
    "keep-one": (2, 20, [1, 1]),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_gather_tokens_and_sequence(kernels, case, dtype, contiguous):
    batch, length, keep = case
    index, valid = ragged_plan(batch, length, keep)
    if keep == [length] * batch:
        index = torch.arange(length).expand(batch, length).contiguous()
    hidden = torch.randn(batch, 40, length, dtype=torch.float32).to(dtype).transpose(1, 2)  # [B, L, 40]
    if contiguous:
        hidden = hidden.contiguous()
    positions = torch.arange(length).expand(batch, length) * 3
    mask = (torch.rand(batch, length) > 0.2).long()
    assert torch.equal(kernels.gather_tokens(hidden, index), reference.gather_tokens_reference(hidden, index))
    got = kernels.gather_sequence(hidden, positions, mask, index, valid)
    expected = reference.gather_sequence_reference(hidden, positions, mask, index, valid)
    for g, e in zip(got, expected, strict=True):
        assert g.is_contiguous() and g.dtype == e.dtype and torch.equal(g, e)


def test_gather_tokens_broadcast_batch_and_bool_mask(kernels):
    index, valid = ragged_plan(3, 12, [4, 9, 2])
    table = torch.randn(1, 12, 8)  # a rotary table shared by the batch
    assert torch.equal(kernels.gather_tokens(table, index), reference.gather_tokens_reference(table, index))
    hidden, positions = torch.randn(3, 12, 8), torch.arange(12)[None]
    mask = torch.rand(3, 12) > 0.3
    got = kernels.gather_sequence(hidden, positions, mask, index, valid)
    for g, e in zip(
        got, reference.gather_sequence_reference(hidden, positions, mask, index, valid), strict=True
    ):
        assert torch.equal(g, e)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_kv(kernels, case, dtype):
    batch, length, keep = case
    index, _ = ragged_plan(batch, length, keep)
    keys = torch.randn(batch, 3, length, 16).to(dtype)
    values = torch.randn(batch, 3, 16, length).to(dtype).transpose(2, 3)  # non-contiguous
    got = kernels.gather_kv(keys, values, index)
    for g, e in zip(got, reference.gather_kv_reference(keys, values, index), strict=True):
        assert g.is_contiguous() and torch.equal(g, e)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_tokens(kernels, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 24, generator=g).to(dtype)
    size = torch.randint(1, 4, (2, 30), generator=g).float()
    dest = torch.randint(0, 10, (2, 30), generator=g)
    dest[:, 0] = 9  # destination 9 is used; some others may be empty
    merged, total = kernels.merge_tokens(x, size, dest, 12)
    expected, expected_total = reference.merge_tokens_reference(x, size, dest, 12)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(merged, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(total, expected_total)
    assert torch.equal(merged[:, 10:], torch.zeros_like(merged[:, 10:]))  # nothing was sent there


def test_merge_reference_is_a_weighted_mean():
    x = torch.tensor([[[1.0], [3.0], [10.0]]])
    merged, total = reference.merge_tokens_reference(
        x, torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([[0, 0, 1]]), 2
    )
    torch.testing.assert_close(merged, torch.tensor([[[2.5], [10.0]]]))
    torch.testing.assert_close(total, torch.tensor([[4.0, 2.0]]))


def similar_tokens(num_images: int, num_tokens: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random visual tokens ``[I, N, 32]`` with exact duplicates (tied scores) and a zero token."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(num_images, num_tokens, 32, generator=g)
    tokens[:, 5], tokens[:, 9] = tokens[:, 3], tokens[:, 3]
    tokens[:, 7] = 0.0
    return tokens.to(dtype)


#: (images, tokens per image, kept)
GREEDY = {
    "one": (2, 64, 1),
    "some": (3, 64, 16),
    "all": (2, 40, 40),
    "odd": (4, 100, 37),
    "llava": (2, 576, 64),
}


@pytest.mark.parametrize("case", GREEDY.values(), ids=GREEDY.keys())
@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_max_min_kernel(kernels, case, dtype):
    """DivPrune's loop in one program per image keeps exactly the reference's tokens, ties included."""
    num_images, num_tokens, keep = case
    tokens = similar_tokens(num_images, num_tokens, dtype)
    distance = 1.0 - cosine_similarity_matrix(tokens, tokens)
    first = torch.randint(0, num_tokens, (num_images,), generator=torch.Generator().manual_seed(1))
    got = kernels.greedy_select(distance, None, first, keep, 0.0)
    assert torch.equal(got, greedy.greedy_max_min_reference(distance, first, keep))
    assert (got[:, 1:] > got[:, :-1]).all() and bool((got == first[:, None]).any(dim=1).all())


@pytest.mark.parametrize("case", GREEDY.values(), ids=GREEDY.keys())
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_greedy_mmr_kernel(kernels, case, lam):
    """IDPruner's loop in one program per image keeps exactly the reference's tokens, ties included."""
    num_images, num_tokens, keep = case
    tokens = similar_tokens(num_images, num_tokens, torch.float32, seed=2)
    similarity = cosine_similarity_matrix(tokens, tokens)
    importance = min_max(tokens.norm(dim=-1))
    first = importance.argmax(dim=1)
    got = kernels.greedy_select(similarity, lam * importance, first, keep, 1.0 - lam)
    expected = greedy.greedy_mmr_reference(similarity, lam * importance, 1.0 - lam, first, keep)
    assert torch.equal(got, expected)


def dpp_kernel(num_images: int, num_tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """CDPruner's kernel ``[I, N, N]``: random relevance times the cosine similarity of random tokens of a few
    directions plus noise (rank ``dim``), with exact duplicates (tied gains) and a zero token."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(num_images, num_tokens, 6, generator=g) @ torch.randn(6, dim, generator=g)
    tokens = tokens + 0.5 * torch.randn(num_images, num_tokens, dim, generator=g)
    tokens[:, 5], tokens[:, 9] = tokens[:, 3], tokens[:, 3]
    tokens[:, 7] = 0.0
    relevance = torch.rand(num_images, num_tokens, generator=g)
    relevance[:, 5], relevance[:, 9] = relevance[:, 3], relevance[:, 3]
    similarity = cosine_similarity_matrix(tokens, tokens)
    return relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)


#: (images, tokens per image, kept, feature dimension: the kernel's rank, but for the duplicates and zero)
DPP = {
    "one": (2, 64, 1, 32),
    "some": (3, 100, 37, 64),
    "all": (2, 40, 40, 64),
    "llava": (2, 576, 64, 256),
}


@pytest.mark.parametrize("case", DPP.values(), ids=DPP.keys())
def test_greedy_dpp_kernel(kernels, case):
    """CDPruner's loop in one program per image keeps the reference's tokens, ties included (its gains are
    summed in another order: the same picks while no two gains lie within float32 rounding)."""
    num_images, num_tokens, keep, dim = case
    kernel = dpp_kernel(num_images, num_tokens, dim)
    got = kernels.greedy_dpp(kernel, keep)
    assert torch.equal(got, dpp.greedy_dpp_reference(kernel, keep))
    assert not ((got == 5) | (got == 9)).any() or keep == num_tokens  # duplicates of 3: no gain once it is in


def test_greedy_dpp_kernel_past_the_rank(kernels):
    """More picks than the kernel's rank: the gains left are rounding noise, on which the kernel and the
    reference may order differently, but each token is picked once and the first picks agree."""
    kernel = dpp_kernel(2, 64, 12, seed=1)
    got = kernels.greedy_dpp(kernel, 48)
    assert all(row.unique().numel() == 48 for row in got) and int(got.max()) < 64
    assert torch.equal(kernels.greedy_dpp(kernel, 10), dpp.greedy_dpp_reference(kernel, 10))


#: (images, tokens per image, kept): DivPrune's cases, LLaVA's 576 tokens with a short loop (each step of the
#: interpreted kernel reads the whole matrix)
COVERAGE = {**{k: v for k, v in GREEDY.items() if k != "llava"}, "llava": (1, 576, 12)}


@pytest.mark.parametrize("case", COVERAGE.values(), ids=COVERAGE.keys())
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_greedy_coverage_kernel(kernels, case, alpha):
    """SCOPE's loop in one program per image keeps exactly the reference's tokens, ties included (duplicate
    tokens, a zero token, and with ``alpha=0`` a saliency of 1 everywhere)."""
    num_images, num_tokens, keep = case
    tokens = similar_tokens(num_images, num_tokens, torch.float32, seed=3)
    similarity = cosine_similarity_matrix(tokens, tokens)
    saliency = torch.rand(num_images, num_tokens, generator=torch.Generator().manual_seed(4)) ** alpha
    got = kernels.greedy_coverage(similarity, saliency, keep)
    assert torch.equal(got, greedy.greedy_coverage_reference(similarity, saliency, keep))
    assert (got[:, 1:] > got[:, :-1]).all()


def test_greedy_coverage_sums_exactly():
    """Gains are integer sums of rounded similarities, the same in any order: two candidates whose terms are
    the same numbers in another order tie exactly, and the lower index wins."""
    similarity = torch.tensor(
        [[1.0, 0.1, 0.2, 0.3], [0.1, 1.0, 0.3, 0.2], [0.2, 0.3, 1.0, 0.1], [0.3, 0.2, 0.1, 1.0]]
    )
    picks = greedy.greedy_coverage_reference(similarity[None], torch.ones(1, 4), 1)
    assert picks.tolist() == [[0]]


def test_dispatch_picks_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_triton(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.zeros(1))  # Triton is installed here (dev extra): the interpreter can run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep", [1, 5, 24])
def test_attention_top_k_kernel(kernels, dtype, keep):
    """SparseVILA's selection of a decode step in one program per image (grouped heads, a left-padded row,
    two images in a row, two new tokens) keeps the tokens the method keeps from the attention computed in
    float32 from the same queries and keys, and writes them as both masks."""
    g = torch.Generator().manual_seed(keep)
    batch, heads, kv_heads, new, head_dim, slots, length = 2, 6, 2, 2, 16, 90, 80
    query = torch.randn(batch, new, heads, head_dim, generator=g).to(dtype).transpose(1, 2)  # as projected
    key = torch.randn(batch, kv_heads, slots, head_dim, generator=g).to(dtype)
    allowed = torch.ones(batch, 1, new, slots, dtype=torch.bool)
    allowed[1, ..., :7] = False  # left padding
    allowed[:, :, 0, length + new - 1 :] = False  # the first new token does not see the second
    allowed[..., length + new :] = False  # empty slots of a static cache
    positions = torch.stack([torch.arange(10, 34), torch.arange(40, 64), torch.arange(30, 54)])
    sample = torch.tensor([0, 0, 1])
    visual = torch.zeros(batch, length, dtype=torch.bool)
    visual[sample[:, None], positions] = True
    scaling = head_dim**-0.5

    scores = query[:, :, -1:].float() @ key.float().repeat_interleave(heads // kv_heads, 1).transpose(2, 3)
    scores = (scores[:, :, 0] * scaling).masked_fill(~allowed[:, :, -1], float("-inf"))
    attention = scores.softmax(dim=-1).mean(dim=1)  # [B, C]
    ctx = SelectionContext(
        features=torch.empty(3, 24, 0),
        grid=None,
        image_index=torch.zeros(3, dtype=torch.long),
        attention=attention[sample[:, None], positions],
    )
    kept = get_method("sparsevila").select(ctx, keep, {})
    visible = ~visual
    visible[sample[:, None], torch.gather(positions, 1, kept)] = True
    expected_attend = (
        allowed & torch.nn.functional.pad(visible, (0, slots - length), value=True)[:, None, None]
    )

    attend, got = kernels.attention_top_k(
        query, key, allowed[:, 0, -1].contiguous(), positions, sample, keep, scaling, allowed.clone(), ~visual
    )
    assert torch.equal(got, visible)
    assert torch.equal(attend, expected_attend)
