"""The warmed-up process's heap is set aside from the garbage collector, its garbage collected first."""

from __future__ import annotations

import gc
import weakref

from worker import heap


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the collector frees it


def test_set_aside_frees_the_garbage_first_and_freezes_what_lives():
    garbage, kept = Node(), Node()
    gone = weakref.ref(garbage)
    del garbage
    try:
        frozen = heap.set_aside()
        assert gone() is None  # frozen garbage would never be freed
        assert frozen == gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # a collection no longer walks it
    finally:
        gc.unfreeze()
