"""Exact scores on a tensor-parallel model: every rank scores over all heads, in one process's order.

transformers' tensor parallelism (``from_pretrained(path, tp_plan="auto")`` under ``torchrun``) shards a
decoder layer's ``q_proj``/``k_proj``/``v_proj`` by output feature ("colwise"): their weights become
``DTensor`` s sharded on dim 0, each rank computes the heads of its own slice, and ``o_proj`` sums the
ranks' outputs. The scores tokenprune recomputes from those projections (the last query's attention, the
keys, the instruction's attention; a ``kv`` method's per-step scores over the cached keys, which hold the
rank's heads too) would then average each rank's own heads, and the ranks would keep different tokens.

Here a projection's output, or a tensor laid out by its heads, is gathered across the ranks that shard it:
a shard holds consecutive output features (whole heads), rank after rank along the mesh, so the gathered
tensor is what one process computes, its heads in the same order. Every rank then computes the same
scores and keeps the same tokens as one process. On a model that is not sharded nothing is gathered.

:func:`check_tensor_parallel` refuses, before any hook is placed, what cannot be scored exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _internals as internals

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch built without distributed support: no model is sharded
    DTensor = None


def _is_dtensor(value: object) -> bool:
    """Whether ``value`` is a DTensor (a parameter of a sharded module is one)."""
    return DTensor is not None and isinstance(value, DTensor)


def _output_shards(projection: nn.Module) -> int:
    """Into how many slices a linear ``projection`` splits its output features across ranks (1: none)."""
    weight = getattr(projection, "weight", None)
    if not _is_dtensor(weight):
        return 1
    mesh = weight.device_mesh
    return math.prod(mesh.size(i) for i, p in enumerate(weight.placements) if p == Shard(0))


def gather_output(projection: nn.Module, local: torch.Tensor, dim: int = -1, width: int = 1) -> torch.Tensor:
    """``local`` with every rank's part of it: the tensor one process computes.

    ``local`` holds, along ``dim``, this rank's share of linear ``projection``'s output features, in
    entries of ``width`` features each (1: the features themselves; a head's width: heads). Where
    ``projection`` is sharded by output feature across ranks (a DTensor weight sharded on dim 0), the
    ranks' shares are gathered in mesh order, which is the order of the features in one process; where
    it is not, or ``local`` already has every feature (a projection whose output the plan gathers),
    ``local`` itself is returned. Every rank of the mesh must call this at the same point (a collective).
    """
    if _output_shards(projection) == 1:
        return local
    full = projection.out_features // width
    dim = dim % local.dim()
    if local.shape[dim] == full:
        return local
    weight = projection.weight
    placements = [Shard(dim) if p == Shard(0) else Replicate() for p in weight.placements]
    shape = (*local.shape[:dim], full, *local.shape[dim + 1 :])
    stride = torch.empty(shape, device="meta").stride()
    gathered = DTensor.from_local(
        local.contiguous(), weight.device_mesh, placements, run_check=False, shape=shape, stride=stride
    )
    return gathered.full_tensor()


def project(projection: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``projection(inputs)`` with every output feature, however the projection is sharded across ranks
    (see :func:`gather_output`)."""
    return gather_output(projection, projection(inputs))


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is split across ranks (a DTensor not replicated on every rank):
    its outputs may then hold a rank's share only."""
    return any(
        _is_dtensor(p) and any(not placement.is_replicate() for placement in p.placements)
        for p in module.parameters()
    )


def _head_sharding_problem(projection: nn.Module, head_dim: int) -> str | None:
    """Why :func:`gather_output` cannot gather the heads of ``projection`` exactly, or ``None`` if it can:
    its weight must be replicated or sharded on its output features (dim 0), whole heads per rank."""
    weight = getattr(projection, "weight", None)
    if not _is_dtensor(weight):
        return None
    odd = [p for p in weight.placements if p != Shard(0) and not p.is_replicate()]
    if odd:
        return f"is sharded as {tuple(weight.placements)}, not by output feature (colwise)"
    shards = _output_shards(projection)
    heads = projection.out_features // head_dim
    if heads % shards:
        return f"splits its {heads} heads unevenly over {shards} ranks"
    return None


def check_tensor_parallel(model: nn.Module, vision_stage: bool, decode_stage: bool) -> None:
    """``ValueError`` naming the module, where the tensor-parallel sharding of ``model`` (a VLM) keeps a
    pruner from scoring exactly as one process does; nothing for a model that is not sharded.

    Supported: the language model's query and key projections replicated or sharded by whole heads (as
    ``tp_plan="auto"`` shards them); for a ``kv`` method (``decode_stage``), the query and key projections
    of each layer sharded alike (their heads are gathered together). Not supported: a method acting in the
    vision tower (``vision_stage``) on a model whose vision tower is sharded.
    """
    if not any(_is_dtensor(p) for p in model.parameters()):
        return
    base = model if hasattr(model, "language_model") else getattr(model, "model", None)
    if getattr(base, "language_model", None) is None:  # an image encoder alone: every method acts in it
        if is_sharded(model):
            raise ValueError(
                "tokenprune does not support a tensor-parallel image encoder: load it without a tp_plan"
            )
        return
    language_model = base.language_model
    for index, layer in enumerate(internals.decoder_layers(language_model)):
        attention = layer.self_attn
        for name in ("q_proj", "k_proj"):
            problem = _head_sharding_problem(getattr(attention, name), attention.head_dim)
            if problem is not None:
                raise ValueError(
                    f"tokenprune cannot score tokens exactly on this tensor-parallel model: layer {index}'s "
                    f"self_attn.{name} {problem}; shard attention projections colwise by whole heads "
                    '(tp_plan="auto") or not at all'
                )
        if decode_stage and _sharding(attention.q_proj) != _sharding(attention.k_proj):
            raise ValueError(
                f"a kv method cannot score tokens exactly on this tensor-parallel model: layer {index}'s "
                "q_proj and k_proj are sharded differently, so a rank's query heads are not the ones its "
                'key heads serve; shard both alike (tp_plan="auto")'
            )
    if vision_stage and any(
        is_sharded(module) for child, module in base.named_children() if child != "language_model"
    ):
        raise ValueError(
            "vision-stage methods are not supported on a model whose vision tower or projector is "
            "tensor-parallel: leave them out of the tp_plan, or use a pre_llm, llm or kv method"
        )


def _sharding(projection: nn.Module) -> tuple | None:
    """The mesh and placements of a projection's weight (``None`` where it is not a DTensor)."""
    weight = projection.weight
    return (weight.device_mesh, tuple(weight.placements)) if _is_dtensor(weight) else None
