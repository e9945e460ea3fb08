"""Methods as pure functions on random tensors: the contract every method keeps, and each one's idea."""

import re

import pytest
import torch

import tokenprune as tp
from tokenprune.context import Embeddings, Instruction, InstructionRows, Merged, SelectionContext
from tokenprune.methods.adaptinfer import text_guided_scores
from tokenprune.methods.baselines import grid_sample
from tokenprune.methods.sparsevlm import text_raters
from tokenprune.registry import get_method

METHODS = sorted(m for m, (stage, _) in tp.list_methods().items() if stage != "vision")


def random_instruction_rows(images: int, n: int, g: torch.Generator, heads=4, queries=5) -> InstructionRows:
    """Random causal attention rows of an instruction of ``queries`` tokens (the last image's one shorter)."""
    rows = torch.rand(images, heads, queries, n + queries, generator=g)
    rows[..., n:] = rows[..., n:].tril()  # a query sees the instruction tokens up to itself
    rows = rows / rows.sum(dim=-1, keepdim=True)
    mask = torch.ones(images, queries, dtype=torch.bool)
    mask[-1, -1] = False
    return InstructionRows(rows[..., :n], rows[..., n:], mask)


def random_instruction(images: int, n: int, dim: int, g: torch.Generator, queries=5) -> Instruction:
    """A random instruction of ``queries`` tokens after the image's ``n`` (the last image's one shorter)."""
    mask = torch.ones(images, queries, dtype=torch.bool)
    mask[-1, -1] = False
    features = torch.randn(images, queries, dim, generator=g)
    positions = torch.arange(queries).expand(images, queries) + n + 3
    return Instruction(torch.randn(images, queries, 8, generator=g), features, mask, positions)


def random_embeddings(images: int, n: int, dim: int, g: torch.Generator, queries=5) -> Embeddings:
    """Random input embeddings of an image's ``n`` tokens (the last image's two fewer) and of an instruction
    of ``queries`` tokens (the last image's one shorter)."""
    visual_mask = torch.ones(images, n, dtype=torch.bool)
    visual_mask[-1, -2:] = False
    mask = torch.ones(images, queries, dtype=torch.bool)
    mask[-1, -1] = False
    visual, text = torch.randn(images, n, dim, generator=g), torch.randn(images, queries, dim, generator=g)
    return Embeddings(visual, visual_mask, text, mask)


def random_context(images=3, rows=6, cols=8, dim=16, seed=0) -> SelectionContext:
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    return SelectionContext(
        features=torch.randn(images, n, dim, generator=g),
        grid=(rows, cols),
        image_index=torch.arange(images),
        keys=torch.randn(images, n, 8, generator=g),
        attention=torch.rand(images, n, generator=g).softmax(-1),
        transition=torch.rand(images, n, generator=g),
        instruction_attention=torch.rand(images, n, generator=g).softmax(-1),
        unrotated_logits=torch.randn(images, n, 4, generator=g),
        instruction_rows=random_instruction_rows(images, n, g),
        prompt_positions=torch.arange(n).expand(images, n) + 3,  # after 3 text tokens
        pruning_layer_attention=torch.rand(images, n, generator=g).softmax(-1),
        instruction=random_instruction(images, n, dim, g),
        embeddings=random_embeddings(images, n, dim, g),
    )


def kept_index(result: torch.Tensor | Merged) -> torch.Tensor:
    """A method's keep indices: a merging decoder method's (``holitom_llm``) are its :class:`Merged`'s."""
    return result.index if isinstance(result, Merged) else result


def merged_features(result: torch.Tensor | Merged) -> torch.Tensor:
    """The features a merging method gives its kept tokens (empty for one that only drops)."""
    return result.features if isinstance(result, Merged) else torch.empty(0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keep", [1, 5, 24, 47, 48])
def test_contract_sorted_unique_in_range(method, keep):
    ctx = random_context()
    index = kept_index(get_method(method).select(ctx, keep, {}))
    assert index.shape == (3, keep) and index.dtype == torch.long
    if keep == 48:
        assert torch.equal(index, torch.arange(48).expand(3, 48))


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method):
    a = get_method(method).select(random_context(), 12, {})
    b = get_method(method).select(random_context(), 12, {})
    assert torch.equal(kept_index(a), kept_index(b)) and torch.equal(merged_features(a), merged_features(b))


@pytest.mark.parametrize("method", METHODS)
def test_each_image_is_selected_on_its_own(method):
    ctx = random_context()
    result = get_method(method).select(ctx, 12, {})
    together, together_features = kept_index(result), merged_features(result)
    for i in range(3):
        alone = SelectionContext(
            features=ctx.features[i : i + 1],
            grid=ctx.grid,
            image_index=ctx.image_index[i : i + 1],
            keys=ctx.keys[i : i + 1],
            attention=ctx.attention[i : i + 1],
            transition=ctx.transition[i : i + 1],
            instruction_attention=ctx.instruction_attention[i : i + 1],
            unrotated_logits=ctx.unrotated_logits[i : i + 1],
            instruction_rows=InstructionRows(
                *(t[i : i + 1] for t in (ctx.instruction_rows.visual, ctx.instruction_rows.text)),
                ctx.instruction_rows.mask[i : i + 1],
            ),
            prompt_positions=ctx.prompt_positions[i : i + 1],
            pruning_layer_attention=ctx.pruning_layer_attention[i : i + 1],
            instruction=Instruction(
                *(t[i : i + 1] for t in vars(ctx.instruction).values())  # keys, features, mask, positions
            ),
            embeddings=Embeddings(*(t[i : i + 1] for t in vars(ctx.embeddings).values())),
        )
        result = get_method(method).select(alone, 12, {})
        assert torch.equal(kept_index(result), together[i : i + 1])
        torch.testing.assert_close(merged_features(result), together_features[i : i + 1], atol=1e-6, rtol=0)


def test_random_is_seeded_per_image():
    ctx = random_context()
    a = get_method("random").select(ctx, 12, {"seed": 1})
    b = get_method("random").select(ctx, 12, {"seed": 2})
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # images of one prompt draw differently


def test_uniform_covers_the_grid():
    index = grid_sample(12, 6, 8)
    rows, cols = index // 8, index % 8
    assert len(set(rows.tolist())) >= 3 and len(set(cols.tolist())) >= 4
    assert rows.min() <= 1 and rows.max() >= 4 and cols.min() <= 1 and cols.max() >= 6


def test_uniform_samples_of_a_12x12_grid_keep_the_rows_of_evenly_spaced_bins():
    # 8 rows kept of 12: the bins are 1.5 rows wide, centred at 0.75, 2.25, ... -> rows 0, 2, 3, 5, ...;
    # 4 rows of 12: bins 3 rows wide, centred at 1.5, 4.5, ... -> rows 1, 4, 7, 10 (README's shapes findings)
    assert sorted(set((grid_sample(72, 12, 12) // 12).tolist())) == [0, 2, 3, 5, 6, 8, 9, 11]
    assert sorted(set((grid_sample(16, 12, 12) // 12).tolist())) == [1, 4, 7, 10]


@pytest.mark.parametrize(
    ("keep", "rows", "cols"), [(1, 1, 1), (7, 3, 3), (9, 3, 3), (13, 4, 5), (20, 4, 5), (5, 1, 9)]
)
def test_grid_sample_counts(keep, rows, cols):
    index = grid_sample(keep, rows, cols)
    assert index.numel() == keep == index.unique().numel() and int(index.max()) < rows * cols


def test_fastv_keeps_the_most_attended():
    ctx = random_context()
    index = get_method("fastv").select(ctx, 5, {})
    expected = ctx.attention.topk(5, dim=1).indices.sort(dim=1).values
    assert torch.equal(index, expected)


def test_method_contract_is_enforced():
    from tokenprune.registry import MethodSpec

    bad = MethodSpec("bad", lambda ctx, keep: torch.tensor([[3, 1]]), 0, (), "", ())
    ctx = random_context(images=1)
    with pytest.raises(RuntimeError, match="sorted"):
        bad.select(ctx, 2, {})
    with pytest.raises(RuntimeError, match="shape"):
        bad.select(ctx, 3, {})


def clustered_context(
    prototypes: int = 4, copies: int = 12, dim: int = 16, seed: int = 0
) -> SelectionContext:
    """One image whose tokens are noisy copies of a few prototype vectors (near-duplicates)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(prototypes, dim, generator=g) * 5
    labels = torch.arange(prototypes).repeat(copies)
    features = centres[labels] + 0.01 * torch.randn(prototypes * copies, dim, generator=g)
    return SelectionContext(
        features=features[None],
        grid=None,
        image_index=torch.zeros(1, dtype=torch.long),
        keys=torch.randn(1, prototypes * copies, 8, generator=g),
        prompt_positions=torch.arange(prototypes * copies)[None],
    ), labels


def test_divprune_covers_every_cluster_before_repeating_one():
    ctx, labels = clustered_context()
    index = get_method("divprune").select(ctx, 4, {})
    assert sorted(labels[index[0]].tolist()) == [0, 1, 2, 3]


def test_dart_keeps_pivots_and_avoids_their_duplicates():
    ctx, labels = clustered_context(prototypes=2)
    pivot = int(ctx.keys[0].abs().sum(-1).argmax())
    index = get_method("dart").select(ctx, 2, {"pivots": 1})
    assert pivot in index[0].tolist()
    # the second token is taken from the other cluster: the pivot's near-duplicates are dropped
    assert sorted(labels[index[0]].tolist()) == [0, 1]


def test_idpruner_trades_importance_for_diversity():
    # three orthogonal near-duplicate clusters; cluster 2 has the largest norms (most "important")
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(8)
    centres = torch.eye(16)[:3] * torch.tensor([[4.0], [5.0], [6.0]])
    features = centres[labels] + 0.01 * torch.randn(24, 16, generator=g)
    ctx = SelectionContext(features=features[None], grid=None, image_index=torch.zeros(1, dtype=torch.long))
    by_importance = get_method("idpruner").select(ctx, 3, {"lam": 1.0})
    assert labels[by_importance[0]].tolist() == [2, 2, 2]  # lam=1: importance only, duplicates and all
    balanced = get_method("idpruner").select(ctx, 3, {"lam": 0.4})
    assert sorted(labels[balanced[0]].tolist()) == [0, 1, 2]  # one token per cluster


def test_transprune_mixes_transition_and_instruction_attention():
    ctx = random_context()
    by_transition = get_method("transprune").select(ctx, 5, {"alpha": 1.0})
    assert torch.equal(by_transition, ctx.transition.topk(5, dim=1).indices.sort(dim=1).values)
    by_attention = get_method("transprune").select(ctx, 5, {"alpha": 0.0})
    assert torch.equal(by_attention, ctx.instruction_attention.topk(5, dim=1).indices.sort(dim=1).values)
    with pytest.raises(ValueError, match="alpha"):
        get_method("transprune").select(ctx, 5, {"alpha": -0.1})


def test_sublayer_transition_terms():
    from tokenprune.transition import sublayer_transition

    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    # same, doubled, turned 90 degrees; the last row is padding
    after = torch.tensor([[[1.0, 0.0], [0.0, 4.0], [-4.0, 3.0], [1.0, 0.0]]])
    valid = torch.tensor([[True, True, True, False]])
    # magnitude ratios 1, 2, 1 times the softmax of the direction changes 0, 0, 1 over the three tokens
    expected = torch.tensor([[1.0, 2.0, torch.e, 0.0]]) / (2.0 + torch.e)
    torch.testing.assert_close(sublayer_transition(x, after, valid), expected)


def test_feather_keeps_its_grid_and_the_most_attended_then_attention_alone():
    ctx = random_context()  # a 6x8 grid: the stride-3 grid is rows 0 and 3, columns 0, 3 and 6
    ctx.unrotated_logits[:, 40:] += 10.0  # attention piles up at the bottom row
    grid = {0, 3, 6, 24, 27, 30}
    for row in get_method("feather").select(ctx, 12, {}):
        assert grid <= set(row.tolist()) and len(set(row.tolist()) & set(range(40, 48))) == 6
    # a budget under the grid's size keeps grid cells spread over it: the 2nd, 4th and 6th of six
    assert get_method("feather").select(ctx, 3, {}).tolist() == [[3, 24, 30]] * 3
    ctx.stage = 1  # a later stage of a schedule: attention alone
    for row in get_method("feather").select(ctx, 6, {}):
        assert set(row.tolist()) <= set(range(40, 48))  # no grid cell is forced in


def test_feather_without_a_grid_samples_every_stride_squared_token():
    ctx = random_context()
    ctx.grid = None
    ctx.unrotated_logits[:, 40:] += 10.0
    assert get_method("feather").select(ctx, 6, {"stride": 3}).tolist() == [[0, 9, 18, 27, 36, 45]] * 3


@pytest.mark.parametrize(
    ("indices", "error"),
    [
        ([[3, 1]], "must return sorted, unique indices"),
        ([[2, 2]], "must return sorted, unique indices"),
        ([[-1, 2]], r"returned indices outside \[0, 8\)"),
        ([[2, 8]], r"returned indices outside \[0, 8\)"),
    ],
)
def test_a_method_breaking_the_index_contract_is_named(indices, error):
    from tokenprune.registry import _REGISTRY

    tp.register_method("_broken", default_layer=0)(lambda ctx, keep: torch.tensor(indices))
    try:
        image_index = torch.zeros(1, dtype=torch.long)
        ctx = SelectionContext(features=torch.zeros(1, 8, 4), grid=None, image_index=image_index)
        with pytest.raises(RuntimeError, match=f"method '_broken' {error}"):
            get_method("_broken").select(ctx, 2, {})
    finally:
        del _REGISTRY["_broken"]


def test_adaptinfer_scores_by_the_text_weighted_attention_of_the_instruction():
    """The score, written term by term: s_v = sum over heads h and instruction queries q of
    w_hq * a_h(q, v), where w_hq = sum_i a_h(i, q) + sum_j a_h(q, j) - a_h(q, q) over the instruction's
    tokens (the symmetric text-to-text attention summed over its rows); padded queries count nowhere."""
    g = torch.Generator().manual_seed(3)
    rows = random_instruction_rows(2, 10, g)
    expected = torch.zeros(2, 10)
    for i in range(2):
        tokens = int(rows.mask[i].sum())
        text = rows.text[i, :, :tokens, :tokens]
        for h in range(text.shape[0]):
            for q in range(tokens):
                weight = text[h, :, q].sum() + text[h, q, :].sum() - text[h, q, q]
                expected[i] += weight * rows.visual[i, h, q]
    torch.testing.assert_close(text_guided_scores(rows.visual, rows.text, rows.mask), expected)
    ctx = random_context()
    top = text_guided_scores(
        ctx.instruction_rows.visual, ctx.instruction_rows.text, ctx.instruction_rows.mask
    )
    kept = get_method("adaptinfer").select(ctx, 12, {})
    assert torch.equal(kept, top.topk(12, dim=1).indices.sort(dim=1).values)


# -- options: declared once (annotation and range), checked when a config is built ---------------------

OPTIONS = [(name, option) for name in sorted(tp.list_methods()) for option in get_method(name).declared]


def wrong_type(option) -> object:
    """A value of another type than ``option`` takes (a bool for a number: bools are not numbers here)."""
    return {bool: 1, int: 2.0, float: "0.5", str: 3}[option.type]


def out_of_range(option, values: dict) -> list[object]:
    """Values just outside ``option``'s declared range (and non-finite ones for a float option)."""
    bounds = [values[b] if isinstance(b, str) else b for b in (option.low, option.high)]
    step = 1 if option.type is int else 0.001
    found = [] if bounds[0] is None else [bounds[0] - step]
    found += [] if bounds[1] is None else [bounds[1] + step]
    return found + ([float("nan"), float("inf")] if option.type is float else [])


def test_every_method_option_is_declared():
    import inspect

    for name in tp.list_methods():
        spec = get_method(name)
        params = inspect.signature(spec.fn).parameters.values()
        keyword_only = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert [option.name for option in spec.declared] == keyword_only
    assert {f"{name}.{option.name}" for name, option in OPTIONS if option.low is not None} >= {
        "dart.pivots", "dart.text_pivots", "feather.stride", "hiprune.alpha", "idpruner.lam",
        "saint.divisor", "tome.r", "transprune.alpha", "turbo.alpha", "visionzip.contextual",
    }  # fmt: skip


@pytest.mark.parametrize(("method", "option"), OPTIONS, ids=[f"{m}-{o.name}" for m, o in OPTIONS])
def test_each_option_is_checked_for_type_and_range(method, option):
    tp.PrunerConfig(method, keep_ratio=0.5, options={option.name: option.default})
    prefix = f"{method} option {option.name} must be "
    with pytest.raises(TypeError, match=prefix + re.escape(option.accepts())):
        tp.PrunerConfig(method, keep_ratio=0.5, options={option.name: wrong_type(option)})
    if option.optional:
        tp.PrunerConfig(method, keep_ratio=0.5, options={option.name: None})
    else:
        with pytest.raises(TypeError, match=prefix):
            tp.PrunerConfig(method, keep_ratio=0.5, options={option.name: None})
    for value in out_of_range(option, get_method(method).options):
        with pytest.raises(ValueError, match=prefix + re.escape(option.accepts())):
            tp.PrunerConfig(method, keep_ratio=0.5, options={option.name: value})


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"pivots": "x"}, TypeError, "dart option pivots must be an int >= 1, got 'x' (str)"),
        ({"pivots": 0}, ValueError, "dart option pivots must be an int >= 1, got 0"),
        ({"pivots": True}, TypeError, "dart option pivots must be an int >= 1, got True (bool)"),
        ({"text_pivots": 9}, ValueError, "text_pivots must be an int in [0, pivots], or None, got 9 with"),
        ({"pivots": 4, "text_pivots": 5}, ValueError, "got 5 with pivots=4"),
    ],
)
def test_a_bad_dart_option_names_the_option_and_what_it_accepts(options, error, message):
    with pytest.raises(error) as caught:
        tp.PrunerConfig("dart", keep_ratio=0.25, options=options)
    assert message in str(caught.value)
    tp.PrunerConfig("dart", keep_ratio=0.25, options={"pivots": 4, "text_pivots": 4})  # bounds are inclusive


@pytest.mark.parametrize(
    ("declare", "match"),
    [
        (lambda: tp.register_method("_o")(lambda ctx, keep, *, x=1: None), "x must be annotated int, float"),
        (lambda: tp.register_method("_o", ranges={"y": (0, 1)})(_int_option), r"ranges given for \['y'\]"),
        (lambda: tp.register_method("_o", ranges={"x": (2, None)})(_int_option), "x must be an int >= 2"),
        (lambda: tp.register_method("_o", ranges={"b": (0, 1)})(_bool_option), "b is not a number"),
        (lambda: tp.register_method("_o", projected=True)(_int_option), "projected is for vision methods"),
        (
            lambda: tp.register_method("_o", stage="vision", per_layer=True, projected=True)(_int_option),
            "projected is for vision methods",
        ),
        (lambda: tp.register_method("_o", decoder_stage="fastv")(_int_option), "decoder_stage and encoder"),
        (lambda: tp.register_method("_o", stage="vision", encoder_factor=0)(_int_option), "encoder_factor"),
    ],
)
def test_a_bad_option_declaration_fails_at_registration(declare, match):
    with pytest.raises((TypeError, ValueError), match=match):
        declare()
    assert "_o" not in tp.list_methods()


def _int_option(ctx: SelectionContext, keep: int, *, x: int = 1) -> torch.Tensor:
    """A method with one int option."""


def _bool_option(ctx: SelectionContext, keep: int, *, b: bool = True) -> torch.Tensor:
    """A method with one bool option."""


def test_a_str_option_of_a_user_method_is_checked():
    from tokenprune.registry import _REGISTRY

    def mine(ctx: SelectionContext, keep: int, *, mode: str = "a") -> torch.Tensor:
        """A user's method with a string option."""

    tp.register_method("_mine")(mine)
    try:
        tp.PrunerConfig("_mine", keep_ratio=0.5, options={"mode": "b"})
        with pytest.raises(TypeError, match="_mine option mode must be a string, got 1"):
            tp.PrunerConfig("_mine", keep_ratio=0.5, options={"mode": 1})
    finally:
        del _REGISTRY["_mine"]


def test_sparsevlm_raters_are_the_instruction_tokens_above_the_mean_relevance():
    """An instruction token aligned with every image token takes most of each image token's softmax: it
    alone rates; where the instruction's tokens are alike, all of them do (none is above the mean)."""
    visual = torch.ones(1, 4, 2)
    instruction = torch.tensor([[[3.0, 3.0], [0.0, 0.0], [-1.0, 0.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, True, True, False]])  # the last pads: never a rater
    embeddings = Embeddings(visual, torch.ones(1, 4, dtype=torch.bool), instruction, mask)
    assert text_raters(embeddings).tolist() == [[True, False, False, False]]
    alike = Embeddings(visual, embeddings.visual_mask, torch.zeros(1, 4, 2), mask)
    assert text_raters(alike).tolist() == [[True, True, True, False]]
