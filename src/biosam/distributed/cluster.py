"""The Dask client biosam's scale-out runs on, and what every worker sets up once.

A worker loads each model once and reuses it for every task (see
:func:`biosam.load.keep_models`); on the CPU it runs torch on as many threads as
it has task slots, so ``N`` workers of one thread each use ``N`` cores, not
``N`` times all of them. GPU workers are started by the user, one per GPU
(``dask worker ... --resources GPU=1``), and are left to torch's defaults.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

from biosam.errors import InputError

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "biosam[distributed]"'


def require_distributed() -> None:
    """Refuse, with the install line, when ``dask.distributed`` is not installed."""
    if importlib.util.find_spec("distributed") is None:
        raise InputError(f"dask.distributed: not installed; it runs biosam on several workers. "
                         f"Install it with: {INSTALL_HINT}")


def quiet_dask_logs() -> None:
    """For the command line: Dask's scheduler and worker INFO lines only when biosam is verbose (-v) too."""
    require_distributed()
    importlib.import_module("distributed")  # importing it sets its loggers to INFO: set them after that

    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger("distributed").setLevel(logging.WARNING)


class _WorkerSetup:
    """Per worker process, once: keep loaded models, and on the CPU one torch thread per task slot."""

    name = "biosam-worker-setup"
    idempotent = True

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def setup(self, worker: Any) -> None:
        from biosam.load import keep_models
        from biosam.runtime import configure_cpu

        keep_models()
        threads = self.threads if self.threads is not None else getattr(worker.state, "nthreads", None)
        logger.info("biosam worker %s: %s", worker.address, configure_cpu(threads=threads))

    def teardown(self, worker: Any) -> None:
        pass


def worker_plugin(threads: int | None = None) -> Any:
    """A ``WorkerPlugin`` doing :class:`_WorkerSetup` (``threads`` None: the worker's own thread count)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    plugin_type = type("BiosamWorkerSetup", (_WorkerSetup, WorkerPlugin), {"__module__": __name__})
    return plugin_type(threads)


@contextlib.contextmanager
def open_client(workers: int = 2, scheduler: str | None = None, client: Any = None,
                memory_limit: str | None = "auto") -> Iterator[Any]:
    """A ``distributed.Client`` with biosam's worker setup: ``client`` as given, the cluster at ``scheduler``
    (``tcp://host:8786``), or a new ``LocalCluster`` of ``workers`` processes with one thread each.

    A cluster this function started is closed on the way out.
    """
    require_distributed()
    from distributed import Client, LocalCluster

    if workers < 1:
        raise InputError(f"workers: {workers} is not a number of workers; give 1 or more.")
    with contextlib.ExitStack() as stack:
        if client is None and scheduler is not None:
            try:
                client = stack.enter_context(Client(scheduler, timeout="30s"))
            except OSError as exc:
                raise InputError(f"{scheduler}: no Dask scheduler answers there ({exc}). Check the address, or "
                                 "leave --scheduler out to run on this machine.") from None
        elif client is None:
            # processes, not threads: torch and the GIL would serialise threads, and a crashed worker is restarted
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       memory_limit=memory_limit, dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        client.register_plugin(worker_plugin(), name=_WorkerSetup.name)
        yield client
