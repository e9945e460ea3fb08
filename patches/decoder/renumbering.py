"""Renumbered positions (``positions="renumbered"``): the kept tokens' position ids close up at a stage.

A hook on the rotary embedding records the position ids of each forward (``Call.rotary_positions``). At a
stage layer the kept tokens' ids close up (:func:`tokenprune.positions.renumbering_shift`) and the
following layers get the rotary tables of those ids; a decode step's ids are moved down by what each stage
moved its prompt's last token, in the stage's layers (the language model's own ids for a stage at layer 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune.positions import renumbering_shift
from tokenprune.sequence import Compaction

from .layout import Call


def renumbering(call: Call, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each token's position moves down ``[B, L_cur]`` when the tokens ``keep`` flags (of the current
    layout) close up (see :func:`tokenprune.positions.renumbering_shift`), and the rotary position ids so
    moved ``[A, B, L_cur]`` (``A`` axes)."""
    positions = call.rotary_positions
    batch, length = keep.shape
    axes = positions.expand(*positions.shape[:-2], batch, length).reshape(-1, batch, length)
    shift = renumbering_shift(axes, keep & call.attention_mask.bool(), call.sequence_ids)
    return shift, axes - shift


def renumbered_tables(
    call: Call, plan: Compaction, moved: torch.Tensor, hidden: torch.Tensor, rotary: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary ``(cos, sin)`` of the pruned layout ``hidden [B, L', D]``, its tokens at the ``moved``
    positions ``[A, B, L_cur]`` (see :func:`renumbering`), which ``call`` keeps for a later stage."""
    lead = call.rotary_positions.shape[:-2]
    pruned = plan.gather(moved.permute(1, 2, 0).contiguous()).permute(2, 0, 1)  # [A, B, L']
    call.rotary_positions = pruned.reshape(*lead, *pruned.shape[1:])
    return rotary(hidden, call.rotary_positions)


def decode_shift(shift: torch.Tensor | None, plan: Compaction) -> torch.Tensor | None:
    """How far a stage moved its rows' last prompt token down ``[B, 1]``: the tokens after the prompt follow
    it (``None`` for original positions). The pruned layout ends each row with its last token."""
    return None if shift is None else plan.gather(shift)[:, -1:]


def shifted_step(
    call: Call,
    hidden: torch.Tensor,
    position_ids: torch.Tensor | None,
    shift: torch.Tensor,
    rotary: nn.Module,
) -> dict[str, Any]:
    """A decode step's positions from a renumbering stage on: each row's moved down by ``shift [B, 1]``, and
    the rotary tables of those positions."""
    call.rotary_positions = call.rotary_positions - shift
    update = {"position_embeddings": rotary(hidden, call.rotary_positions)}
    if position_ids is not None:
        update["position_ids"] = position_ids - shift
    return update
