"""Where the images of a batch are: numbering their tokens three ways, and grouping them by size."""

import pytest
import torch

from tokenprune.sequence import (
    image_groups,
    image_ids_by_count,
    image_ids_by_lengths,
    image_ids_by_runs,
    keep_masks,
    plan_compaction,
)

T, F = True, False
VISUAL = torch.tensor([[F, T, T, F, T, T, T, F], [F, F, T, T, T, T, F, F]])


def test_runs_number_each_run_row_by_row():
    expected = torch.tensor([[-1, 0, 0, -1, 1, 1, 1, -1], [-1, -1, 2, 2, 2, 2, -1, -1]])
    assert torch.equal(image_ids_by_runs(VISUAL), expected)


def test_counts_split_adjacent_images():
    visual = torch.tensor([[F, T, T, T, T, F], [T, T, F, F, F, F]])
    expected = torch.tensor([[-1, 0, 0, 1, 1, -1], [2, 2, -1, -1, -1, -1]])
    assert torch.equal(image_ids_by_count(visual, 2), expected)
    with pytest.raises(ValueError, match="each image must have 3 placeholder tokens"):
        image_ids_by_count(visual, 3)


def test_lengths_split_images_of_different_sizes():
    visual = torch.tensor([[F, T, T, T, T, T, F], [T, T, T, F, F, F, F]])
    expected = torch.tensor([[-1, 0, 0, 1, 1, 1, -1], [2, 2, 2, -1, -1, -1, -1]])
    assert torch.equal(image_ids_by_lengths(visual, torch.tensor([2, 3, 3])), expected)
    with pytest.raises(ValueError, match="hold 8 image tokens but the images have"):
        image_ids_by_lengths(visual, torch.tensor([2, 3]))


def test_groups_of_equal_size_and_key():
    ids = image_ids_by_runs(VISUAL)  # images of 2, 3 and 4 tokens
    groups = image_groups(ids)
    assert [g.positions.tolist() for g in groups] == [[[1, 2]], [[4, 5, 6]], [[2, 3, 4, 5]]]
    assert [g.image.tolist() for g in groups] == [[0], [1], [2]]
    assert [g.image_index.tolist() for g in groups] == [[0], [1], [0]]  # place within its prompt
    same = image_ids_by_count(torch.tensor([[T, T, F, T, T]]), 2)
    assert [g.image.tolist() for g in image_groups(same)] == [[0, 1]]
    assert [g.image.tolist() for g in image_groups(same, key=torch.tensor([5, 7]))] == [[0], [1]]


def test_keep_masks_keep_text_and_the_chosen_tokens_of_each_group():
    groups = image_groups(image_ids_by_runs(VISUAL))
    keep = keep_masks(VISUAL, [(g, torch.zeros(1, 1, dtype=torch.long)) for g in groups])
    expected = torch.tensor([[T, T, F, T, T, F, F, T], [T, T, T, F, F, F, T, T]])
    assert torch.equal(keep, expected)
    plan = plan_compaction(keep)
    assert plan.valid.sum(dim=1).tolist() == [5, 5]
