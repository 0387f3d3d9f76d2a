"""Python's cyclic garbage collector held off while a sampled step's statistics are gathered and written.

A sampled step creates a few Python objects per watched tensor (the per-parameter gradient views, the 0-d
results of the reductions, one 0-d tensor per scalar put into ``trainer.callback_metrics``): thousands on a
model of a thousand modules. Every 700 such allocations trigger a collection, and some of them a full one, which
walks the whole heap of a training process (torch, Lightning, the model): the cost per watched module then grows
with the size of the process, not with the module. These objects are freed by reference counting (none of them
is in a cycle), so the collector has nothing to find in them: :func:`gc_paused` holds it off for the length of
the block and lets the next allocation after it run at most one collection. Measured with
``bench/scaling.py``'s 1,000-module model: ``GradientStatsMonitor``'s sampled-step hooks took half the time
with the collector off.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator

__all__ = ["gc_paused"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector for the block (reference counting still frees everything at once).

    Nesting is fine, and a collector the user turned off stays off.

    Example:
        >>> import gc
        >>> with gc_paused():
        ...     gc.isenabled()
        False
        >>> gc.isenabled()
        True
    """
    was_enabled = gc.isenabled()
    if was_enabled:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
