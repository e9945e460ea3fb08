"""Counting what a forward asks of the device, on a CPU: the ops it dispatches and the values it reads back.

On a GPU each torch op is at least one kernel launch, and each read of a device value by the host
(``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``, ``nonzero``, boolean indexing, ``unique``,
``repeat_interleave`` without ``output_size``...) waits for every queued kernel: the launches after it
stop overlapping the GPU's work, and a ``torch.compile``d forward breaks its graph there. Both are
visible on a CPU, where nothing else about GPU speed is.
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Ops whose output the host must read (a value, or a size that depends on values) before it can go on.
READING_OPS = frozenset(
    {
        aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
        aten.nonzero.default,
        aten.nonzero_static.default,  # its size is given, but the CPU kernel and some backends still read
        aten.masked_select.default,
        aten._unique.default,
        aten._unique2.default,
        aten.unique_dim.default,
        aten.unique_consecutive.default,
        aten.equal.default,
    }
)
#: Tensor methods that copy values to the host without dispatching an op on a CPU tensor.
READING_METHODS = frozenset({torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu})


def reads_the_device(func, args: tuple, kwargs: dict) -> bool:
    """Whether the dispatched op ``func(*args, **kwargs)`` makes the host wait for a device value: one of
    :data:`READING_OPS`, an index by a boolean mask, or ``repeat_interleave`` by a tensor of repeats with no
    ``output_size``."""
    if func in READING_OPS:
        return True
    packet = func._overloadpacket
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    return func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None


class CountOps(TorchDispatchMode):
    """Counts the torch ops dispatched in the block (``.count``): on a CPU, the honest proxy for what a GPU
    would launch."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class _ReadingMethods(TorchFunctionMode):
    def __init__(self, reads: DeviceReads):
        super().__init__()
        self._reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READING_METHODS:
            self._reads.saw(func.__name__)
        return func(*args, **(kwargs or {}))


class DeviceReads(TorchDispatchMode):
    """Counts the host's reads of device values in the block (``.count``): each a host sync on a GPU.

    ``sites`` counts them by where they happened (the op, and the innermost frames of the caller's stack
    outside torch: file, line and function), to find them. Use as a context manager.
    """

    def __init__(self):
        super().__init__()
        self.count = 0
        self.sites: Counter[str] = Counter()
        self._methods = _ReadingMethods(self)

    def __enter__(self):
        self._methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._methods.__exit__(*exc)

    def saw(self, what: str) -> None:
        """Count one read, of kind ``what``, at the current call site."""
        self.count += 1
        frames = [
            f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
            for frame in traceback.extract_stack()
            if "/torch/" not in frame.filename and not frame.filename.endswith("dispatch.py")
        ]
        self.sites[f"{what} at {' < '.join(reversed(frames[-3:]))}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if reads_the_device(func, args, kwargs):
            self.saw(func._overloadpacket.__name__)
        return func(*args, **kwargs)
