"""Where the images of a batch are: numbering their tokens three ways, telling the rows' images apart
(by shapes or by counts read from the device), and grouping them by size."""

import pytest
import torch

from tokenprune.sequence import (
    ImageRows,
    image_ids_by_count,
    image_ids_by_lengths,
    image_ids_by_runs,
    image_layouts,
    items_in_prompt_order,
    keep_masks,
    plan_compaction,
    rows_by_counts,
    rows_by_shapes,
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


def test_lengths_split_images_of_different_sizes():
    visual = torch.tensor([[F, T, T, T, T, T, F], [T, T, T, F, F, F, F]])
    expected = torch.tensor([[-1, 0, 0, 1, 1, 1, -1], [2, 2, 2, -1, -1, -1, -1]])
    assert torch.equal(image_ids_by_lengths(visual, torch.tensor([2, 3, 3])), expected)
    with pytest.raises(ValueError, match="hold 8 image tokens but the images have"):
        image_ids_by_lengths(visual, torch.tensor([2, 3]))


def test_shapes_tell_rows_apart_where_no_row_can_hold_one_image_more():
    assert rows_by_shapes([4, 6], 1, 20) == ImageRows((4, 6), (2,))
    assert rows_by_shapes([4, 6], 2, 9) == ImageRows((4, 6), (1, 1))  # 4 + 6 > 9: one each
    assert rows_by_shapes([4, 6], 2, 10) is None  # one row could hold both
    assert rows_by_shapes([4, 4, 4], 2, 20) is None  # 3 images in 2 rows
    assert rows_by_shapes([2, 2, 3, 3], 2, 6) == ImageRows((2, 2, 3, 3), (2, 2))


def test_counts_tell_rows_apart_and_refuse_split_images():
    assert rows_by_counts([2, 3, 4], [5, 0, 4], [7, 2, 6]) == ImageRows((2, 3, 4), (2, 0, 1), (7, 2, 6))
    with pytest.raises(ValueError, match="not whole images"):
        rows_by_counts([2, 3, 4], [3, 6], None)  # the second image split between the rows
    with pytest.raises(ValueError, match="not whole images"):
        rows_by_counts([2, 3], [2, 2], None)  # a row short


def test_layouts_group_images_of_equal_size_and_key():
    rows = rows_by_counts([2, 3, 4], VISUAL.sum(dim=1).tolist())  # images of 2, 3 and 4 tokens
    groups = image_layouts(VISUAL, rows)
    assert [g.positions.tolist() for g in groups] == [[[1, 2]], [[4, 5, 6]], [[2, 3, 4, 5]]]
    assert [g.images for g in groups] == [(0,), (1,), (2,)]
    assert [g.image_index.tolist() for g in groups] == [[0], [1], [0]]  # place within its prompt
    assert [g.sample.tolist() for g in groups] == [[0], [0], [1]]
    same = torch.tensor([[T, T, F, T, T]])
    assert [g.images for g in image_layouts(same, ImageRows((2, 2), (2,)))] == [(0, 1)]
    assert [g.images for g in image_layouts(same, ImageRows((2, 2), (2,)), keys=[5, 7])] == [(0,), (1,)]


def test_layouts_of_rows_alike_are_one_group():
    visual = torch.tensor([[F, T, T, F, T, T], [T, T, F, T, T, F]])
    (group,) = image_layouts(visual, ImageRows((2, 2, 2, 2), (2, 2)))
    assert group.positions.tolist() == [[1, 2], [4, 5], [0, 1], [3, 4]]
    assert group.sample.tolist() == [0, 0, 1, 1] and group.image_index.tolist() == [0, 1, 0, 1]


def test_keep_masks_keep_text_and_the_chosen_tokens_of_each_group():
    groups = image_layouts(VISUAL, ImageRows((2, 3, 4), (2, 1)))
    keep = keep_masks(VISUAL, [(g, torch.zeros(1, 1, dtype=torch.long)) for g in groups])
    expected = torch.tensor([[T, T, F, T, T, F, F, T], [T, T, T, F, F, F, T, T]])
    assert torch.equal(keep, expected)
    plan = plan_compaction(keep, 5)
    assert plan.valid.sum(dim=1).tolist() == [5, 5]


def test_items_in_prompt_order_number_images_and_videos_together():
    # row 0: image 0, a video split by a word (frames apart), image 1 right after it; row 1: video 1
    images = torch.tensor([[0, 0, -1, -1, -1, -1, 1, -1], [-1, -1, -1, -1, -1, -1, -1, -1]])
    videos = torch.tensor([[-1, -1, 0, -1, 0, 0, -1, -1], [-1, 1, 1, 1, -1, -1, -1, -1]])
    expected = torch.tensor([[0, 0, 1, -1, 1, 1, 2, -1], [-1, 3, 3, 3, -1, -1, -1, -1]])
    assert torch.equal(items_in_prompt_order(images, videos), expected)
    assert torch.equal(items_in_prompt_order(images, torch.full_like(videos, -1)), images)
