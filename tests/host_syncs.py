"""Test-only: count what would make the host wait for a GPU, on a CPU run.

A device-to-host read (``.item()``, ``.tolist()``, a tensor used as a Python bool), an op whose output size depends
on the data (``nonzero``, boolean indexing, ``masked_select``, ``repeat_interleave`` without ``output_size``,
``unique``) and a blocking copy from pageable host memory to a device each stall the host until the GPU has caught
up. On a CPU nothing stalls, but the same ops run, so :class:`HostSyncs` counts them (at the dispatcher, plus the
Python-level reads that bypass it on a CPU tensor). :class:`SyncCounter` counts them per training micro-batch of a
run, from the start of the batch to its end (forward, backward, optimizer step and the callbacks' batch-end hooks).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode_stack

aten = torch.ops.aten
DATA_DEPENDENT = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
    aten.unique_consecutive.default, aten.unique_dim.default,
}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def is_sync(func, args, kwargs) -> bool:
    if func in DATA_DEPENDENT:
        return True
    if func in INDEXING:  # a boolean index is a nonzero inside
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None)
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in (aten._to_copy.default, aten.copy_.default):
        source = args[1] if func is aten.copy_.default else args[0]
        target = args[0].device if func is aten.copy_.default else kwargs.get("device", source.device)
        return source.device.type == "cpu" and torch.device(target).type != "cpu" and not source.is_pinned()
    return False


class HostSyncs(TorchDispatchMode):
    """Within: ``self.ops`` counts the syncing ops by name. ``host_resident``: tensors that stay in host memory on a
    GPU run too (AdamW's step counts, by torch's design), whose reads cost nothing."""

    def __init__(self, host_resident: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self._host_resident = {id(t) for t in host_resident}
        self._patched: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_sync(func, args, kwargs) and not (func is aten._local_scalar_dense.default and id(args[0]) in self._host_resident):
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        # On a CPU tensor these read its memory directly, past the dispatcher; on a GPU each one waits.
        for name in ("tolist", "numpy"):
            self._patched[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def _counted(self, name, original):
        def read(tensor, *args, **kwargs):
            if self in _get_current_dispatch_mode_stack():  # not inside a stand-in kernel (see not_counted)
                self.ops[name] += 1
            return original(tensor, *args, **kwargs)

        return read


def not_counted():
    """Within: nothing is counted (a stand-in for a GPU kernel computes on the host what the kernel does on the GPU)."""
    return _disable_current_modes()


class SyncCounter(L.Callback):
    """Writes the syncing ops of each training micro-batch (a list of {op: count}) to ``{path}.{rank}`` (JSON)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.batches: list[dict[str, int]] = []
        self._mode = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        steps = [state["step"] for optimizer in trainer.optimizers for state in optimizer.state.values() if "step" in state]
        self._mode = HostSyncs(host_resident=[step for step in steps if torch.is_tensor(step)])
        self._mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mode.__exit__(None, None, None)
        self.batches.append(dict(self._mode.ops))

    def on_train_end(self, trainer, pl_module) -> None:
        with open(f"{self.path}.{trainer.global_rank}", "w") as file:
            json.dump(self.batches, file)
