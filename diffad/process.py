"""The end of a process that ran diffad: exit without the interpreter's last garbage collection.

At exit CPython runs a full collection over every object it still tracks. After torch and timm
(which imports torch._dynamo and sympy) and a chapter's work, that is a walk over millions of
objects: a chapter kernel's shutdown took 2.4-2.5 s with it and 0.3-0.4 s without it (chapter 7
under nbclient, 2 runs each; 18 chapters in a book build). Nothing needs that collection at exit:
diffad closes every file it writes as soon as it is written (checkpoints and cached results are
also fsynced, :func:`diffad.io.atomic_save`), and atexit handlers (IPython's history, tqdm) still run. :func:`skip_final_collection` moves every object out of the collector's
reach at exit (``gc.freeze``), so the interpreter ends without the walk. The chapters'
``book.setup`` and the ``diffad`` command call it; a library user's own program is left as it is.

This module imports nothing else from diffad.
"""

from __future__ import annotations

import atexit
import gc

_registered = False


def skip_final_collection() -> None:
    """Freeze the heap at interpreter exit (registered once per process), so that exit skips the
    last full garbage collection. Handlers registered later run before it, with the collector on."""
    global _registered
    if not _registered:
        atexit.register(gc.freeze)
        _registered = True
