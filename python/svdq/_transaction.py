"""All-or-nothing changes to a model (docs/reliability.md).

Every operation that changes a model (`svdq.quantize`, `svdq.load`, `load_lora`, `unload_lora`,
`set_lora_strength`) first does its slow, failure-prone work without touching the model (reading, checking,
quantizing), then applies the result in one short step inside `model_transaction`:

- `ModuleSnapshot` records, for every module, its attribute dict and the *contents* of its dict-valued
  attributes (``_parameters``, ``_buffers``, ``_modules``, hook dicts, …). The apply steps only replace
  entries of those dicts (module swaps, ``load_state_dict(assign=True)``, buffer assignment, hook
  registration), never write into tensors, so restoring the dicts restores the model exactly — the same
  tensor objects, no copies. The dict objects themselves are kept (cleared and refilled), so hook handles
  created before the snapshot still remove their hooks afterwards.
- `deferred_interrupts` holds SIGINT (Ctrl-C) for the apply step and delivers it right after, so a
  KeyboardInterrupt lands before the step (state: before) or after it (state: after), never inside. Any other
  exception in the step (out of memory, a bug) restores the snapshot and is re-raised.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections import OrderedDict
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Delay SIGINT until the block exits (main thread only; elsewhere Python delivers no signals anyway).

    A SIGINT received inside is re-delivered on exit by calling the previous handler (normally raising
    KeyboardInterrupt), after the block's state is consistent. Nested uses hand the signal outwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGINT)
    except (ValueError, OSError):  # no signal support (embedded interpreters)
        yield
        return
    if previous is None or previous is signal.SIG_IGN:  # unknown C handler / ignored: leave it alone
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)  # default_int_handler: raises KeyboardInterrupt here
            else:  # SIG_DFL: terminate the way the signal would have
                os.kill(os.getpid(), signal.SIGINT)


class ObjectSnapshot:
    """The attributes of some objects, and the contents of their dict / set attributes (one level deep);
    `restore` puts them back into the same container objects."""

    def __init__(self, objects):
        self.entries = []
        for obj in objects:
            attrs = dict(obj.__dict__)
            contents = {k: (v, v.copy()) for k, v in attrs.items() if type(v) in _COPYABLE}
            self.entries.append((obj, attrs, contents))

    def restore(self) -> None:
        for obj, attrs, contents in self.entries:
            for key, (container, saved) in contents.items():
                container.clear()
                container.update(saved)
            obj.__dict__.clear()
            obj.__dict__.update(attrs)


class ModuleSnapshot(ObjectSnapshot):
    """The structure of ``model`` (every submodule, see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__(model.modules())


class TensorSnapshot:
    """Copies of a few small tensors that an apply step writes in place (e.g. LoRA strengths)."""

    def __init__(self, tensors):
        self.entries = [(t, t.detach().clone()) for t in tensors]

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in self.entries:
                t.copy_(saved)


# Exact types (not isinstance): the containers nn.Module keeps its state in; other dict subclasses that a
# model may hold (e.g. diffusers' FrozenDict config) are immutable or not ours to refill.
_COPYABLE = (dict, set, OrderedDict)


@contextlib.contextmanager
def model_transaction(*models: nn.Module, extra=()) -> Iterator[None]:
    """Apply a change to ``models`` all-or-nothing: snapshot, defer SIGINT, restore on any exception.

    extra: objects with ``restore()`` (snapshots of state outside the modules, e.g. the LoRA registry),
    taken before the block and restored too.
    """
    with deferred_interrupts():
        snapshots = [ModuleSnapshot(m) for m in models]
        try:
            yield
        except BaseException:
            for s in snapshots:
                s.restore()
            for e in extra:
                e.restore()
            raise


def read_all_tensors(f) -> dict:
    """Every tensor of an open safetensors file (``safe_open``), one read at a time with SIGINT held.

    Ctrl-C inside safetensors' reader reaches Python as a ValueError about an UntypedStorage (the
    KeyboardInterrupt raised in its callback is converted), which callers would report as a corrupt file.
    Holding the signal for one tensor's read keeps an interrupt an interrupt (tests/test_faults.py)."""
    tensors = {}
    for key in f.keys():
        with deferred_interrupts():
            tensors[key] = f.get_tensor(key)
    return tensors
