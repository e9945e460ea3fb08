"""The layout of one language-model forward: where the images, prompts and instructions are in each row.

:class:`Call` is the state the hooks of one forward share. At prefill it describes the rows of the current
(possibly already pruned) layout; the functions below read prompts and instructions off it, for the
providers of what methods need (:mod:`.needs`). At a decode step it holds the pruned cache's session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tokenprune.sequence import Compaction, ImageRows, rows_by_counts, rows_by_shapes

if TYPE_CHECKING:
    from .session import Session, StageCache


@dataclass
class Call:
    """State of one language-model forward, shared by its hooks.

    At prefill ``visual``, ``attention_mask`` and ``origin`` describe the rows of the current (possibly
    already pruned) layout; at a decode step ``session`` and ``tail`` describe the pruned cache.
    """

    visual: torch.Tensor | None = None  # [B, L_cur] image token flags
    image_id: torch.Tensor | None = None  # [B, L_cur] number of each token's image, -1 off images
    images: ImageRows | None = None  # the images of each row, as the current layout holds them
    image_sizes: tuple[int, ...] = ()  # tokens of each image in the prompt
    attention_mask: torch.Tensor | None = None  # [B, L_cur] 2-D mask
    origin: torch.Tensor | None = None  # [B, L_cur] prompt position of each row
    real: torch.Tensor | None = None  # [B, L_cur] the row holds a prompt token, not re-padding
    original_length: int = 0  # L, the prompt length
    visual_in: list[int] = field(default_factory=list)  # visual tokens per sample before pruning
    keep_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, L] over the prompt
    new_stages: list[StageCache] = field(default_factory=list)
    first_index: torch.Tensor | None = None
    session: Session | None = None
    tail: torch.Tensor | None = None  # [B, T] 2-D mask of the tokens after the prompt (unprepared decode)
    packed: bool = False  # the call may hold packed sequences (no mask, no cache): the model reads positions
    sequence_ids: torch.Tensor | None = None  # [B, L_cur] packed sequence of each row, where packed
    layer_kwargs: dict[str, Any] = field(default_factory=dict)  # what the following layers get
    scoring_input: torch.Tensor | None = None  # input of the layer whose keys/attention score tokens
    transition: torch.Tensor | None = None  # [B, L_cur] float32 layer transitions summed so far
    pending_transition: torch.Tensor | None = None  # [B, L_cur] a layer's attention's, until its MLP's
    # renumbered positions: the ids the rotary embedding was given (prefill: of the current layout)
    rotary_positions: torch.Tensor | None = None  # [B or 1, L_cur], or [3, B, L_cur] (multimodal RoPE)
    # the prompt as the language model got it, whatever the stages drop: input embeddings, image numbers
    embeddings: torch.Tensor | None = None  # [B, L, D]
    prompt_image_id: torch.Tensor | None = None  # [B, L]

    @classmethod
    def prefill(
        cls,
        visual: torch.Tensor,
        image_id: torch.Tensor,
        mask: torch.Tensor | None,
        packed: bool,
        images: ImageRows,
        embeddings: torch.Tensor | None = None,
    ) -> Call:
        """The call of a prefill whose prompt holds the image placeholders ``visual [B, L]``, numbered by
        ``image_id [B, L]``, laid out in rows as ``images`` says, under the 2-D ``mask`` (``None``: every
        token real); ``embeddings [B, L, D]`` are its input embeddings."""
        batch, length = visual.shape
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=visual.device)
        return cls(
            visual=visual,
            image_id=image_id,
            images=images,
            image_sizes=images.sizes,
            attention_mask=mask,
            origin=torch.arange(length, device=visual.device).expand(batch, length),
            real=torch.ones_like(visual),
            original_length=length,
            visual_in=images.tokens_in_rows,
            packed=packed,
            embeddings=embeddings,
            prompt_image_id=image_id,
        )

    def compact(self, plan: Compaction) -> None:
        """Move the per-row state to the layout ``plan`` compacts to (the mask is gathered with the hidden
        states, by the stage); the kept tokens carry their transition sums on to the next stage."""
        self.visual = plan.gather(self.visual) & plan.valid
        self.image_id = torch.where(self.visual, plan.gather(self.image_id), -1)
        self.origin = plan.gather(self.origin)
        self.real = plan.gather(self.real) & plan.valid
        if self.transition is not None:
            self.transition = plan.gather(self.transition)
        if self.sequence_ids is not None:
            self.sequence_ids = plan.gather(self.sequence_ids)

    def reached(self) -> torch.Tensor:
        """Which prompt tokens ``[B, L]`` the current layout still holds."""
        batch = self.origin.shape[0]
        reached = torch.zeros(batch, self.original_length, dtype=torch.int32, device=self.origin.device)
        return reached.scatter_add_(1, self.origin, self.real.to(torch.int32)) > 0


def image_rows(
    visual: torch.Tensor,
    image_id: torch.Tensor,
    mask: torch.Tensor | None,
    sizes: list[int] | None,
    check: bool,
) -> ImageRows:
    """Where the images of a prefill are (see :class:`~tokenprune.sequence.ImageRows`): from the shapes alone
    where they tell (:func:`~tokenprune.sequence.rows_by_shapes`, for ``sizes``, each image's tokens, that
    the family adapter knew without reading the device), else from one read of each row's image and real
    tokens (and, where the adapter did not know ``sizes``, of each image's). With ``check``, the read is
    made anyway, to check that every row holds whole images (``ValueError`` if not)."""
    batch, length = visual.shape
    by_shapes = rows_by_shapes(sizes, batch, length) if sizes is not None else None
    if by_shapes is not None and not check:
        return by_shapes
    real = mask.sum(dim=1) if mask is not None else torch.full_like(visual[:, 0], length, dtype=torch.long)
    if sizes is None:
        sizes = torch.bincount(image_id.flatten() + 1)[1:].tolist()
    counts, real = torch.stack([visual.sum(dim=1), real]).tolist()
    rows = rows_by_counts(sizes, counts, real)
    return rows if by_shapes is None else by_shapes  # the layout of the calls that do not check


def largest_per_prompt(sequence: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """By prompt ``[B, L]``: at ``p``, the largest of ``values [B, L]`` over the tokens of prompt ``p`` of the
    row (``sequence [B, L]`` numbers each token's prompt from 0); -1 past the row's prompts (values >= -1)."""
    return torch.full_like(values, -1).scatter_reduce(1, sequence, values, "amax")


def last_rows(call: Call) -> torch.Tensor:
    """The position of each row's last real token ``[B]``."""
    valid = call.attention_mask.bool()
    positions = torch.arange(valid.shape[1], device=valid.device)
    return torch.where(valid, positions, -1).amax(dim=1)


def sequences(call: Call) -> torch.Tensor:
    """The prompt each token belongs to ``[B, L]``: its packed sequence in a padding-free row, else 0."""
    if call.sequence_ids is not None:
        return call.sequence_ids
    return torch.zeros_like(call.attention_mask, dtype=torch.long)


def prompt_ends(call: Call) -> torch.Tensor:
    """The position of each prompt's last real token ``[B, P]``, in the order of the prompts: ``P = 1``, but
    for a padding-free row of several prompts (a row with fewer repeats its last; reads the device once
    for P)."""
    last = last_rows(call)[:, None]
    if call.sequence_ids is None:
        return last
    sequence, valid = call.sequence_ids, call.attention_mask.bool()
    positions = torch.arange(valid.shape[1], device=valid.device).expand_as(sequence)
    ends = largest_per_prompt(sequence, torch.where(valid, positions, -1))
    ends = ends[:, : int(sequence.max()) + 1]
    return torch.where(ends >= 0, ends, last)


def instruction_rows(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of each row's instructions ``[B, Q]``: the real tokens after the last visual token of
    their prompt (its last token, where none follows its images; a padding-free row holds several
    prompts), in order; a row with fewer is padded with its last token, and ``counted [B, Q]`` says which
    are not padding. ``Q`` is the most tokens a row holds off its images (known on the host: no read)."""
    valid = call.attention_mask.bool()
    batch, length = valid.shape
    positions = torch.arange(length, device=valid.device).expand(batch, length)
    sequence = sequences(call)

    def per_prompt(values: torch.Tensor) -> torch.Tensor:  # the largest of each token's prompt
        return torch.gather(largest_per_prompt(sequence, values), 1, sequence)

    last = per_prompt(torch.where(valid, positions, -1))
    after_images = per_prompt(torch.where(call.visual, positions, -1))
    instruction = valid & ((positions > after_images) | (positions == last))
    count = instruction.sum(dim=1)
    width = length - min(call.images.tokens_in_rows)
    counted = torch.arange(width, device=valid.device) < count[:, None]
    rows = torch.where(instruction, positions, length).sort(dim=1).values[:, :width]
    return torch.where(counted, rows, last_rows(call)[:, None]), counted
