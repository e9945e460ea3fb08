"""Models that accelerate dispatched with a ``device_map`` (``from_pretrained(path, device_map=...,
max_memory=..., offload_folder=...)``).

Offloaded modules (``"cpu"`` on a machine with an accelerator, ``"disk"``) keep their weights elsewhere and
accelerate's hooks load them at each forward of the module that holds them, on the model's one execution
device. The scores tokenprune recomputes call those modules (``k_proj``, ``q_proj``, the norms), so their
hooks load them as in the model's own forward: nothing to do here for offloading.

Modules on several devices are another matter: the hooks move a layer's inputs to its device only inside
its forward, while the pruner's hooks, which run before it, combine the states of several layers (the
scoring layer's input, the layer's hidden states, the prompt's masks). That is not supported yet and
:func:`check_device_map` refuses it before any hook is placed.
"""

from __future__ import annotations

import torch
from torch import nn

_OFFLOADED = ("cpu", "disk", "meta")  # placements whose modules run on the model's main device


def _device_name(place: int | str | torch.device) -> str:
    """A ``device_map`` entry as a device name: an index is one of the machine's accelerators."""
    accelerator = torch.accelerator.current_accelerator()
    if isinstance(place, int) and accelerator is not None:
        return str(torch.device(accelerator.type, place))
    return str(place) if isinstance(place, int) else str(torch.device(place))


def execution_devices(model: nn.Module) -> list[str]:
    """The devices, other than offload targets, that ``model``'s ``device_map`` (``hf_device_map``) places
    modules on, sorted; empty for a model loaded without one or offloaded only."""
    device_map = getattr(model, "hf_device_map", None) or {}
    return sorted({_device_name(place) for place in device_map.values() if str(place) not in _OFFLOADED})


def check_device_map(model: nn.Module) -> None:
    """``ValueError`` where ``model``'s ``device_map`` runs its modules on more than one device (see the
    module's docstring); nothing otherwise, offloading to CPU and disk included."""
    devices = execution_devices(model)
    if len(devices) > 1:
        raise ValueError(
            f"tokenprune cannot prune a model whose device_map runs its modules on several devices "
            f'({", ".join(devices)}) yet: load it on one device (offloading to "cpu" or "disk" is '
            'fine), or split it over several GPUs with tensor parallelism (torchrun, tp_plan="auto")'
        )
