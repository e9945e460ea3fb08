"""Pure helpers on token sequences: where the images are, and how a pruned batch is laid out."""

from __future__ import annotations

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
        image: each image's number in the batch, row by row ``[I]`` (``None`` where not tracked).
    """

    sample: torch.Tensor
    image_index: torch.Tensor
    positions: torch.Tensor
    image: torch.Tensor | None = None

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


def plan_compaction(keep: torch.Tensor) -> Compaction:
    """Lay out the tokens flagged in ``keep [B, L]`` as a dense, left-padded batch ``[B, L']``.

    ``L'`` is the longest row's kept count; shorter rows are left-padded so that every row still ends at
    its last token, as ``generate`` expects.
    """
    batch, length = keep.shape
    kept = keep.sum(dim=1)
    new_length = int(kept.max())
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
    visual tokens, numbered row by row. ``ValueError`` if a row's count is not a whole number of images."""
    counts = visual.sum(dim=1)
    if bool((counts % tokens_per_image != 0).any()):
        raise ValueError(
            f"each image must have {tokens_per_image} placeholder tokens, but the prompts hold "
            f"{counts.tolist()} image tokens; build the prompt with the model's processor"
        )
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


def image_groups(image_id: torch.Tensor, key: torch.Tensor | None = None) -> list[VisualLayout]:
    """The images of ``image_id [B, L]`` (from :func:`image_ids_by_count` or :func:`image_ids_by_runs`,
    possibly gathered since) in groups of equal token count (and equal ``key [num_images]``, if given):
    one :class:`VisualLayout` per group, its ``image`` the images' numbers, in order."""
    visual = image_id >= 0
    rows, cols = visual.nonzero(as_tuple=True)  # row-major: images in order, tokens in order
    ids = image_id[rows, cols]
    num_images = int(ids.max()) + 1 if ids.numel() else 0
    counts = torch.bincount(ids, minlength=num_images)
    sample = torch.zeros(num_images, dtype=torch.long, device=image_id.device).scatter_(0, ids, rows)
    per_row = torch.bincount(sample, minlength=image_id.shape[0])
    first = torch.cumsum(per_row, 0) - per_row
    image_index = torch.arange(num_images, device=image_id.device) - first[sample]
    group_key = counts if key is None else torch.stack([counts, key], dim=1)
    layouts = []
    for value in torch.unique(group_key, dim=0):
        members = (group_key == value).view(num_images, -1).all(dim=1).nonzero()[:, 0]
        n = int(counts[members[0]])
        positions = cols[torch.isin(ids, members)].view(len(members), n)
        layouts.append(VisualLayout(sample[members], image_index[members], positions, members))
    return layouts
