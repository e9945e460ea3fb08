"""Pure helpers on token sequences: where the images are, and how a pruned batch is laid out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .kernels import gather_sequence, gather_tokens


@dataclass
class VisualLayout:
    """Where the visual tokens of a batch are: ``I`` images of ``N`` tokens each.

    Attributes:
        sample: batch row of each image ``[I]``.
        image_index: index of each image within its own prompt ``[I]``.
        positions: sequence position of each visual token ``[I, N]``.
        images: each image's number in the batch, row by row (on the host).
    """

    sample: torch.Tensor
    image_index: torch.Tensor
    positions: torch.Tensor
    images: tuple[int, ...]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The visual rows of a sequence tensor ``x [B, L, *rest]`` as ``[I, N, *rest]``."""
        return x[self.sample[:, None], self.positions]


@dataclass
class Compaction:
    """Layout of a pruned batch: row ``b`` holds its kept tokens in order, right-aligned (left padding).

    Attributes:
        index: source position of each slot ``[B, L']``; a padding slot points at some dropped token.
        valid: whether a slot holds a kept token ``[B, L']``.
    """

    index: torch.Tensor
    valid: torch.Tensor

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, L, *rest]`` laid out as the pruned batch ``[B, L', *rest]``."""
        return gather_tokens(x, self.index)

    def gather_sequence(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states ``[B, L', D]``, position ids and 2-D mask ``[B, L']`` of the pruned batch, in one
        pass; the mask is 0 on new padding."""
        return gather_sequence(hidden, position_ids, attention_mask, self.index, self.valid)


def flagged(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices ``[I, count]`` of the True entries of each row of ``mask [I, N]``, which has ``count`` of
    them, in increasing order: a stable sort of the flags, where ``nonzero`` would make the host read the
    device for how many there are."""
    return torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :count]


def grid_neighbours(start: torch.Tensor, end: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Each of ``N`` tokens' flat neighbours ``[N, 4]`` in its row-major grid, the grid of token ``i`` being
    tokens ``start[i]`` to ``end[i] - 1`` in rows ``width[i]`` wide (each ``[N]``): the tokens one before and
    after it and one row above and below, clamped to that grid (so they wrap across rows at its edges)."""
    index = torch.arange(start.shape[0], device=start.device)[:, None]
    steps = torch.tensor([-1, 1, -1, 1], device=start.device)
    step = torch.cat([steps[None, :2].expand(start.shape[0], -1), steps[None, 2:] * width[:, None]], dim=1)
    return torch.minimum(torch.maximum(index + step, start[:, None]), end[:, None] - 1)


def plan_compaction(keep: torch.Tensor, new_length: int) -> Compaction:
    """Lay out the tokens flagged in ``keep [B, L]`` as a dense, left-padded batch ``[B, new_length]``.

    ``new_length`` is the longest row's kept count (which the caller knows on the host: reading it here
    would stall a GPU); shorter rows are left-padded so that every row still ends at its last token, as
    ``generate`` expects.
    """
    batch, length = keep.shape
    kept = keep.sum(dim=1)
    # Stable sort puts dropped tokens first and kept tokens last, each group in original order.
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices
    index = order[:, length - new_length :]
    slots = torch.arange(new_length, device=keep.device)
    valid = slots[None, :] >= (new_length - kept)[:, None]
    return Compaction(index=index, valid=valid)


def places_in_prompts(valid: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """Each token's place among the real tokens of its prompt ``[B, L]``: 0 for a prompt's first real token,
    whatever padding comes before it (``valid [B, L]`` False) or other prompts of a padding-free row
    (``sequence [B, L]`` numbers each token's prompt from 0 along its row). The index the token would have
    in its prompt run alone, as the reference implementations, which run one prompt unpadded, number
    tokens; a padding token's value is meaningless."""
    before = valid.long().cumsum(dim=1) - valid.long()  # real tokens of the row before each
    unset = torch.full_like(before, torch.iinfo(before.dtype).max)
    first = unset.scatter_reduce(1, sequence, torch.where(valid, before, unset), "amin")  # before each prompt
    return before - torch.gather(first, 1, sequence)


def keep_masks(visual: torch.Tensor, selections: list[tuple[VisualLayout, torch.Tensor]]) -> torch.Tensor:
    """Per-token keep flags ``[B, L]``: every non-visual token, and of each group of images ``layout``
    the visual tokens its ``keep_index [I, k]`` names (indices into each image's tokens, 0..N-1)."""
    keep = ~visual
    for layout, keep_index in selections:
        kept_positions = torch.gather(layout.positions, 1, keep_index)
        keep[layout.sample[:, None].expand_as(kept_positions), kept_positions] = True
    return keep


def image_ids_by_count(visual: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """Number each image's tokens ``[B, L]`` (-1 off images), images of ``tokens_per_image`` consecutive
    visual tokens, numbered row by row (that each row holds whole images is :class:`ImageRows`' check)."""
    order = visual.flatten().cumsum(0).view_as(visual) - 1  # rank of each visual token, row-major
    return torch.where(visual, order // tokens_per_image, -1)


def image_ids_by_lengths(visual: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Number each image's tokens ``[B, L]`` (-1 off images), the images having ``lengths [num_images]``
    consecutive visual tokens each, in order row by row. ``ValueError`` if the counts disagree."""
    if int(visual.sum()) != int(lengths.sum()):
        raise ValueError(
            f"the prompts hold {int(visual.sum())} image tokens but the images have {lengths.tolist()}; "
            "build the prompt with the model's processor"
        )
    order = visual.flatten().cumsum(0).view_as(visual) - 1
    ids = torch.searchsorted(lengths.cumsum(0), order, right=True)
    return torch.where(visual, ids, -1)


def image_ids_by_runs(visual: torch.Tensor) -> torch.Tensor:
    """Number each image's tokens ``[B, L]`` (-1 off images) where every image is one run of visual
    tokens between other tokens (as with vision start/end markers), numbered row by row."""
    flat = torch.nn.functional.pad(visual, (1, 0)).int()
    starts = (flat[:, 1:] - flat[:, :-1]) == 1  # [B, L]: a run begins here
    ids = starts.flatten().cumsum(0).view_as(visual) - 1
    return torch.where(visual, ids, -1)


def items_in_prompt_order(images: torch.Tensor, videos: torch.Tensor) -> torch.Tensor:
    """Number images and videos together ``[B, L]`` (-1 elsewhere), in order row by row, from their own
    numberings ``images`` and ``videos`` ``[B, L]`` (each -1 off its items, on tokens apart): an item is a
    stretch of visual tokens of one image or one video, wherever other tokens interrupt it (a video's
    frames apart). Reads nothing from the device."""
    visual = (images >= 0) | (videos >= 0)
    key = torch.where(videos >= 0, -2 - videos, images).flatten()  # one value per item: -1 off them
    place = torch.arange(key.numel(), device=key.device)
    last_visual = torch.where(visual.flatten(), place, -1).cummax(dim=0).values  # at or before each token
    before = torch.nn.functional.pad(last_visual[:-1], (1, 0), value=-1)  # the visual token before each
    starts = visual.flatten() & ((before < 0) | (key != key[before.clamp(min=0)]))
    ids = starts.cumsum(0) - 1
    return torch.where(visual, ids.view_as(visual), -1)


@dataclass(frozen=True)
class ImageRows:
    """Where the images of a batch are, as the host knows it: the tokens of each image, in order row by row,
    and the images of each row. Laying out a pruned batch from these reads nothing from the device.

    Attributes:
        sizes: placeholder tokens of each image.
        per_row: images of each row.
        real: real (unpadded) tokens of each row, where they were read with the rows' image tokens; ``None``
            where the rows were told apart by shapes alone, and compaction keeps every row's padding.
    """

    sizes: tuple[int, ...]
    per_row: tuple[int, ...]
    real: tuple[int, ...] | None = None

    @property
    def rows(self) -> tuple[int, ...]:
        """The row of each image."""
        return tuple(row for row, count in enumerate(self.per_row) for _ in range(count))

    @property
    def places(self) -> tuple[int, ...]:
        """Each image's place among its row's images."""
        return tuple(place for count in self.per_row for place in range(count))

    def in_rows(self, values: Sequence[int]) -> list[int]:
        """The sum of one value per image, ``values``, over each row's images."""
        sums = [0] * len(self.per_row)
        for row, value in zip(self.rows, values, strict=True):
            sums[row] += value
        return sums

    @property
    def tokens_in_rows(self) -> list[int]:
        """The image tokens of each row."""
        return self.in_rows(self.sizes)

    @property
    def regular(self) -> bool:
        """Whether every row holds as many images, all of one size."""
        return len(set(self.per_row)) == 1 and len(set(self.sizes)) == 1


def rows_by_shapes(sizes: list[int], batch: int, length: int) -> ImageRows | None:
    """The rows of ``sizes`` (each image's tokens, in order) in a batch of ``batch`` rows of ``length``
    tokens, where shapes alone tell them apart, else ``None``.

    One row holds them all. ``m = len(sizes) / batch`` images a row where no row can hold ``m + 1`` (the
    ``m + 1`` smallest take more than ``length`` tokens): then every row holds exactly ``m``. This takes the
    model's own check that the prompts hold one placeholder per image token, and each image's placeholders
    in one row (:func:`rows_by_counts` checks that).
    """
    if batch == 1:
        return ImageRows(tuple(sizes), (len(sizes),))
    per_row, rest = divmod(len(sizes), batch)
    if rest or per_row == 0 or sum(sorted(sizes)[: per_row + 1]) <= length:
        return None
    return ImageRows(tuple(sizes), (per_row,) * batch)


def rows_by_counts(sizes: list[int], counts: list[int], real: list[int] | None = None) -> ImageRows:
    """The rows of ``sizes`` (each image's tokens, in order) that hold ``counts`` image tokens each (read
    from the device). ``ValueError`` where a row does not hold whole images."""
    per_row, image = [], 0
    for count in counts:
        held = 0
        while held < count and image < len(sizes):
            held, image = held + sizes[image], image + 1
        per_row.append(image - sum(per_row))
        if held != count:
            break
    if image != len(sizes) or sum(counts) != sum(sizes) or len(per_row) != len(counts):
        raise ValueError(
            f"the prompts hold {counts} image tokens, which are not whole images of {list(sizes)} tokens "
            "row by row; build the prompt with the model's processor"
        )
    return ImageRows(tuple(sizes), tuple(per_row), None if real is None else tuple(real))


def as_videos(rows: ImageRows) -> tuple[ImageRows, tuple[int, ...]]:
    """``rows`` with each row's images the frames of one video, in order: one item per row that holds
    images, of all their tokens; and the video of each image. ``ValueError`` where a row's images differ in
    size (the frames of a video share one grid)."""
    sizes: list[int] = []
    video_of: list[int] = []
    start = 0
    for count in rows.per_row:
        frames = rows.sizes[start : start + count]
        if len(set(frames)) > 1:
            raise ValueError(
                f"images_as_frames takes a prompt's images as the frames of one video, but one prompt's "
                f"images have {list(frames)} tokens: give each prompt frames of one size"
            )
        if count:
            video_of += [len(sizes)] * count
            sizes.append(sum(frames))
        start += count
    per_row = tuple(min(count, 1) for count in rows.per_row)
    return ImageRows(tuple(sizes), per_row, rows.real), tuple(video_of)


def _on(device: torch.device, values: list[int] | tuple[int, ...]) -> torch.Tensor:
    """A small long tensor of host ``values`` on ``device``, copied without waiting for the device."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def image_layouts(visual: torch.Tensor, rows: ImageRows, keys: list[int] | None = None) -> list[VisualLayout]:
    """The images of ``rows`` in the batch whose image tokens are ``visual [B, L]``, in groups of equal token
    count (and equal ``keys``, one per image, if given): one :class:`VisualLayout` per group, in the order of
    their first images. Reads nothing from the device."""
    device = visual.device
    # each row's image tokens first, in order: image i of a row is at its row's offset of i
    order = flagged(visual, visual.shape[1])
    if rows.regular and len(set(keys or [0])) == 1:  # one group, every row alike: a view of ``order``
        count, size = rows.per_row[0], rows.sizes[0]
        images = torch.arange(len(rows.sizes), device=device)
        return [
            VisualLayout(
                images // count,
                images % count,
                order[:, : count * size].reshape(-1, size),
                tuple(range(len(rows.sizes))),
            )
        ]
    offsets, start, row_of, places = [], 0, rows.rows, rows.places
    for image, size in enumerate(rows.sizes):
        start = 0 if image == 0 or row_of[image] != row_of[image - 1] else start
        offsets.append(start)
        start += size
    groups: dict[tuple[int, int], list[int]] = {}
    for image, size in enumerate(rows.sizes):
        groups.setdefault((size, keys[image] if keys else 0), []).append(image)
    layouts = []
    for (size, _), members in groups.items():
        positions = torch.stack([order[row_of[i], offsets[i] : offsets[i] + size] for i in members])
        layouts.append(
            VisualLayout(
                _on(device, [row_of[i] for i in members]),
                _on(device, [places[i] for i in members]),
                positions,
                tuple(members),
            )
        )
    return layouts
