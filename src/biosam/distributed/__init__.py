"""Scale-out on Dask: many inputs on a cluster (:func:`run_batch`), one large image or volume in blocks (:func:`segment_blockwise`).

Needs the ``distributed`` extra (``pip install "biosam[distributed]"``); nothing
here starts a cluster on import.

- :mod:`biosam.distributed.cluster`: the client (a ``LocalCluster`` or an existing scheduler) and its workers' setup;
- :mod:`biosam.distributed.batch`: one ``biosam`` command per input file, with resume and a summary table;
- :mod:`biosam.distributed.blockwise`: automatic segmentation of an image or volume larger than one process, block by block.
"""

from __future__ import annotations

from typing import Any

__all__ = ["open_client", "require_distributed", "run_batch", "segment_blockwise"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import biosam.distributed` works (and says what to install) without dask.
    if name in ("open_client", "require_distributed"):
        from biosam.distributed import cluster

        return getattr(cluster, name)
    if name == "run_batch":
        from biosam.distributed.commands import run_batch

        return run_batch
    if name == "segment_blockwise":
        from biosam.distributed.blockwise import segment_blockwise

        return segment_blockwise
    raise AttributeError(f"module 'biosam.distributed' has no attribute {name!r}")
