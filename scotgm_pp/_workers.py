"""Local Dask workers, started early and cheaply.

A screen run on local workers spends a few seconds before its first fit just bringing the
workers up: each worker is a fresh interpreter that imports what a task needs (about 2 s of CPU,
Dask included; the run's modules do not load PyMC, ArviZ, scanpy or matplotlib).
Two things here take that off the run's critical path:

* :func:`start_fork_server` starts a fork server that imports what a worker needs once
  (:data:`WORKER_PRELOAD`); the workers are then forked from it, ready to work. Started first
  thing, its imports run on another core while this process imports the package and plans.
* :class:`LocalWorkers` starts the cluster in a background thread, so that its start overlaps
  the serial planning pass; hand it to :func:`~scotgm_pp.tl._execute.map_tasks` as ``client``.

The workers also run with Dask's monitors slowed down (:data:`QUIET_MONITORS`), which otherwise
take the GIL from the running task many times a second.

This module imports nothing heavy, so that the command line can call it before it imports the
rest of the package.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

__all__ = ["QUIET_MONITORS", "WORKER_PRELOAD", "SCHEDULER_TIMEOUT", "LocalWorkers", "connect_scheduler",
           "WORKER_HEAP", "local_cluster", "start_fork_server", "worker_environ"]

WORKER_PRELOAD = ("scotgm_pp.tl._execute", "scotgm_pp.tl._store")
"""Modules a local worker of a screen run needs, imported once by the fork server the workers
are forked from."""

_lock = threading.Lock()
_method: str | None = None


WORKER_HEAP = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
"""glibc heap settings of local workers: one arena; arrays up to 1 GiB come from the heap, and up
to 1 GiB of freed memory stays there for the next one. A task's large temporaries (the dense
counts, residuals and PCA input of an experiment, tens of MB each) are otherwise each mapped
afresh and zeroed page by page by the kernel at first touch (glibc maps anything above 32 MB, and
a worker's task thread has its own arena, whose heaps hold at most 64 MB). A worker's resident
memory then stays near its largest task's peak between tasks, instead of falling back after
each. Measured (``benchmarks/README.md``): 3.5% less wall time on a 30,000-cell screen of
8,000 genes with two workers, two runs each way."""


def worker_environ() -> dict:
    """The environment of local workers: one BLAS/OpenMP thread each (Dask's defaults), and
    :data:`WORKER_HEAP` in place of Dask's ``MALLOC_TRIM_THRESHOLD_`` (which also switches off
    glibc's adaptive mmap threshold, so that every array above 128 kB is mapped and unmapped
    afresh; measured: 30 s of system time in a 44 s run). A heap setting already in this
    process's environment is kept."""
    import dask
    import distributed  # noqa: F401 - registers the distributed.* config defaults

    env = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
           if k != "MALLOC_TRIM_THRESHOLD_"}
    env.update({k: os.environ.get(k, v) for k, v in WORKER_HEAP.items()})
    return env


def start_fork_server(preload: tuple = ()) -> str:
    """Start (once per process) the fork server that local workers are forked from, and return
    the start method for them: ``"forkserver"``, or ``"spawn"`` where the platform has no fork
    server (Windows) or one was already running without this package preloaded.

    The server imports ``distributed`` and :data:`WORKER_PRELOAD` (plus ``preload``) in the
    background; a worker forked from it starts without importing anything. It runs with the
    workers' environment (:func:`worker_environ`), so that the BLAS and OpenMP pools it creates
    at import, and so the workers', have one thread.
    """
    global _method
    import multiprocessing
    from multiprocessing import forkserver

    with _lock:
        if _method is not None:
            return _method
        if "forkserver" not in multiprocessing.get_all_start_methods():  # pragma: no cover - Windows
            _method = "spawn"
            return _method
        import dask
        from distributed.utils import get_mp_context

        # distributed sets its own preload list the first time it makes a fork-server context
        with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
            ctx = get_mp_context()
        server = getattr(forkserver, "_forkserver", None)
        if server is not None and getattr(server, "_forkserver_pid", None) is not None:
            _method = "spawn"  # someone else's server, without our modules and environment
            return _method
        ctx.set_forkserver_preload(list(dict.fromkeys(["distributed", *WORKER_PRELOAD, *preload])))
        environ = {k: str(v) for k, v in worker_environ().items()}
        saved = {k: os.environ.get(k) for k in environ}
        os.environ.update(environ)
        try:
            forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        _method = "forkserver"
        return _method


QUIET_MONITORS = {
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.tick.interval": "200ms",
    "distributed.worker.profile.enabled": False,
}
"""Dask's monitors, slowed down for local workers that each run one long task at a time. By
default every worker and its nanny poll the worker's memory with psutil every 100 ms, a system
monitor polls every 500 ms, the event loop ticks every 20 ms and a profiler thread samples the
running task every 10 ms; each wake-up takes the GIL from the task. Measured on a 2-core machine
(20,000 x 5,000 screen): 0.80-0.89 s of CPU per task in a worker by default against 0.74-0.78 s
with these settings (0.69-0.75 s in process), and half the CPU of the event loop of the process
that drives the run. Memory is still watched (each second); there is no dashboard to profile for."""


def local_cluster(n_workers: int, preload: tuple = ()):
    """A local Dask cluster of ``n_workers`` single-threaded worker processes, and its client."""
    import dask
    from dask.distributed import Client, LocalCluster

    config = {"distributed.nanny.pre-spawn-environ": worker_environ(),
              "distributed.worker.multiprocessing-method": start_fork_server(preload), **QUIET_MONITORS}
    with dask.config.set(config):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
    try:
        return cluster, Client(cluster)
    except BaseException:
        cluster.close()
        raise


class LocalWorkers:
    """A local Dask cluster started in a background thread, so that the start of its workers
    overlaps the serial work before the map (reading the labels, the planning pass over the
    counts). Pass it to :func:`~scotgm_pp.tl._execute.map_tasks` as ``client``; whoever starts
    it closes it (:meth:`close`, or use it as a context manager)."""

    def __init__(self, n_workers: int):
        self.n_workers = int(n_workers)
        self._cluster = self._client = self._error = None
        self._thread = threading.Thread(target=self._start, name="scotgm-local-workers", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            self._cluster, self._client = local_cluster(self.n_workers)
        except BaseException as err:  # noqa: BLE001 - re-raised where the client is needed
            self._error = err

    @property
    def client(self):
        """The cluster's client (waits for the start to finish)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._client

    def close(self) -> None:
        self._thread.join()
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None:
                cluster.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SCHEDULER_TIMEOUT = 30.0
"""Seconds a scheduler has to answer (``scotgm ... --scheduler-timeout``)."""


def connect_scheduler(address: str, timeout: float = SCHEDULER_TIMEOUT, what: str = "the scheduler address") -> Client:
    """A ``dask.distributed.Client`` of the scheduler at ``address``, or an :class:`InputError`.

    Dask's own connect waits for the other side's handshake without a limit (a web server on the
    port keeps it waiting for ever) and may read a stranger's bytes as a frame length and try to
    allocate exabytes. So the address is probed first, with every step bounded by ``timeout``
    seconds: connect, handshake, and an ``identity`` request that a scheduler answers with its
    type. A malformed address, nothing listening, a service of another protocol, or a Dask
    process that is not a scheduler ends in a one-line error naming the address (``what`` says
    where it came from).
    """
    import asyncio

    from ._validation import InputError

    def refuse(reason: str) -> InputError:
        return InputError(f"{what} {address!r}: {reason}. Pass the address of a running dask.distributed "
                          "scheduler, e.g. tcp://10.0.0.1:8786.")

    if not isinstance(address, str) or not address.strip():
        raise refuse("not an address")
    try:
        from distributed.comm import connect, parse_address
        from distributed.comm.addressing import parse_host_port
        from distributed.comm.registry import get_backend

        scheme, location = parse_address(address)
        get_backend(scheme)
        if scheme in ("tcp", "tls"):
            parse_host_port(location)
    except (ValueError, TypeError) as err:
        raise refuse(f"not an address of the form tcp://HOST:PORT ({err})") from None

    async def identify():
        comm = await asyncio.wait_for(connect(address, timeout=timeout), timeout)
        try:
            await asyncio.wait_for(comm.write({"op": "identity"}), timeout)
            return await asyncio.wait_for(comm.read(), timeout)
        finally:
            comm.abort()

    try:
        identity = asyncio.run(identify())
    except (TimeoutError, asyncio.TimeoutError):
        raise refuse(f"no Dask scheduler answered within {timeout:g} s (is the scheduler running, and is this its "
                     "port?)") from None
    except OSError as err:
        raise refuse(f"cannot connect ({' '.join(str(err).split())})") from None
    except Exception as err:  # noqa: BLE001 - a stranger's bytes: any decoding error, MemoryError included
        raise refuse(f"the service there does not speak Dask's protocol ({type(err).__name__})") from None
    if not isinstance(identity, dict) or identity.get("type") != "Scheduler":
        kind = identity.get("type") if isinstance(identity, dict) else type(identity).__name__
        raise refuse(f"it answered as {kind!r}, not as a Dask scheduler")
    from dask.distributed import Client

    try:
        return Client(address, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - e.g. it went away between the probe and the connect
        raise refuse(f"the connection failed ({type(err).__name__}: {' '.join(str(err).split())})") from None
