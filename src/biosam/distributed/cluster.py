"""The Dask client biosam's scale-out runs on, and what every worker sets up once.

A worker loads each model once and reuses it for every task (see
:func:`biosam.load.keep_models`); on the CPU it runs torch on as many threads as
it has task slots, so ``N`` workers of one thread each use ``N`` cores, not
``N`` times all of them.

GPUs: a cluster started here on a machine with CUDA devices has one worker per
GPU, each seeing only its own (``CUDA_VISIBLE_DEVICES``) and offering the worker
resource ``GPU=1``; the tasks that run a model ask for that resource
(:func:`task_resources`), so each GPU runs one at a time. On a cluster started
elsewhere, start GPU workers with ``--resources GPU=1`` for the same effect.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
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


GPU_RESOURCE = "GPU"


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (none without CUDA)."""
    import torch

    count = torch.cuda.device_count()  # NVML: does not start a CUDA context in this process
    named = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return named[:count] if named else [str(i) for i in range(count)]


def task_resources(client: Any) -> dict | None:
    """``{"GPU": 1}`` for the tasks that run a model when any worker of ``client`` offers GPUs, else None."""
    workers = client.scheduler_info().get("workers", {}).values()
    return {GPU_RESOURCE: 1} if any(w.get("resources", {}).get(GPU_RESOURCE) for w in workers) else None


def gpu_cluster(devices: list[str], memory_limit: str | None = "auto") -> Any:
    """A local cluster of one single-threaded worker process per CUDA device in ``devices``, each seeing only
    its own device and offering the resource ``GPU=1``."""
    from distributed import Nanny, Scheduler, SpecCluster

    spec = {f"gpu-{device}": {"cls": Nanny, "options": {
        "nthreads": 1, "resources": {GPU_RESOURCE: 1}, "memory_limit": memory_limit,
        # set before the worker process starts, so torch there sees this device only (as cuda:0)
        "env": {"CUDA_VISIBLE_DEVICES": device}}} for device in devices}
    return SpecCluster(workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard": False}})


def _gpu_devices(gpus: int | None) -> list[str]:
    """The devices of a local GPU cluster: every visible one (``gpus`` None), or the first ``gpus``."""
    if gpus == 0:
        return []
    visible = visible_gpus()
    if gpus is None:
        return visible
    if visible and len(visible) < gpus:
        raise InputError(f"gpus: {gpus} asked for, {len(visible)} visible ({', '.join(visible)}).")
    if not visible:  # e.g. CUDA_VISIBLE_DEVICES set for the workers only: numbered as CUDA numbers them
        logger.warning("gpus=%d: no CUDA device visible here; the workers get devices 0..%d", gpus, gpus - 1)
        return [str(i) for i in range(gpus)]
    return visible[:gpus]


@contextlib.contextmanager
def open_client(workers: int = 2, scheduler: str | None = None, client: Any = None,
                memory_limit: str | None = "auto", gpus: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` with biosam's worker setup: ``client`` as given, the cluster at ``scheduler``
    (``tcp://host:8786``), or a new local cluster: ``gpus`` workers, one per GPU (default: one per CUDA
    device visible, see :func:`gpu_cluster`), or without GPUs (``gpus=0`` or none visible) ``workers``
    processes with one thread each.

    A cluster this function started is closed on the way out.
    """
    require_distributed()
    from distributed import Client, LocalCluster

    if workers < 1:
        raise InputError(f"workers: {workers} is not a number of workers; give 1 or more.")
    if gpus is not None and gpus < 0:
        raise InputError(f"gpus: {gpus} is not a number of GPUs; give 0 or more.")
    with contextlib.ExitStack() as stack:
        if client is None and scheduler is not None:
            try:
                client = stack.enter_context(Client(scheduler, timeout="30s"))
            except OSError as exc:
                raise InputError(f"{scheduler}: no Dask scheduler answers there ({exc}). Check the address, or "
                                 "leave --scheduler out to run on this machine.") from None
        elif client is None and (devices := _gpu_devices(gpus)):
            logger.info("Dask: one worker per GPU (CUDA device %s)", ", ".join(devices))
            cluster = stack.enter_context(gpu_cluster(devices, memory_limit))
            client = stack.enter_context(Client(cluster))
        elif client is None:
            # processes, not threads: torch and the GIL would serialise threads, and a crashed worker is restarted
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       memory_limit=memory_limit, dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        client.register_plugin(worker_plugin(), name=_WorkerSetup.name)
        yield client
