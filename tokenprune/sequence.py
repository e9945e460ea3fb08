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
    """

    sample: torch.Tensor
    image_index: torch.Tensor
    positions: torch.Tensor

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The visual rows of a sequence tensor ``x [B, L, *rest]`` as ``[I, N, *rest]``."""
        return x[self.sample[:, None], self.positions]


def find_images(visual: torch.Tensor, tokens_per_image: int) -> VisualLayout:
    """Split the visual positions of ``visual [B, L]`` (bool) into images of ``tokens_per_image`` tokens.

    The placeholders of one image are consecutive, so the k-th run of ``tokens_per_image`` visual
    positions in a row is that row's k-th image. Raises ``ValueError`` when a row's visual token count is
    not a whole number of images.
    """
    counts = visual.sum(dim=1)
    if bool((counts % tokens_per_image != 0).any()):
        raise ValueError(
            f"each image must have {tokens_per_image} placeholder tokens, but the prompts hold "
            f"{counts.tolist()} image tokens; build the prompt with the model's processor"
        )
    rows, cols = visual.nonzero(as_tuple=True)  # row-major: by sample, then position
    positions = cols.view(-1, tokens_per_image)
    sample = rows.view(-1, tokens_per_image)[:, 0]
    images = torch.bincount(sample, minlength=visual.shape[0])
    first = torch.cumsum(images, 0) - images  # index of each sample's first image
    image_index = torch.arange(sample.shape[0], device=visual.device) - first[sample]
    return VisualLayout(sample=sample, image_index=image_index, positions=positions)


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


def keep_mask(visual: torch.Tensor, layout: VisualLayout, keep_index: torch.Tensor) -> torch.Tensor:
    """Per-token keep flags ``[B, L]``: every non-visual token, and the visual tokens in ``keep_index``.

    ``keep_index [I, k]`` indexes each image's tokens (0..N-1).
    """
    keep = ~visual
    kept_positions = torch.gather(layout.positions, 1, keep_index)
    keep[layout.sample[:, None].expand_as(kept_positions), kept_positions] = True
    return keep
