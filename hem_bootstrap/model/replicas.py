"""CPU scans by model replicas: single-threaded copies of the model, each reading and running its own batches.

A model with N intra-op threads on N cores loses twice against the cores it holds: its threads
wait for each other at every operator (two threads ran 1.7x one thread on a 2-core Xeon, not
2x), and everything around the model (reading and decoding tiles, turning the ~70 candidate
boxes per tile of a trained model into image pixels, the seam merge, the GeoPackage rows) runs
on one core while the other spins. Replicas (forked DataLoader workers, one thread each)
read their tiles and run the model on them, so every core stays on useful work; only the
per-tile detections, a few kilobytes, come back to the scan's process, which merges and writes
them in the gaps. Batches come back in plan order, so the merge sees the tiles an in-process
scan sees, in the same order (one thread against two moves a float32 score by ~3e-7, a bf16 one
by ~1e-5). Measured in ``scripts/bench_inference.py`` (``--replicas``).

Replicas run the eager torch paths (``none``, ``channels_last``, ``bf16``) and ``onnxruntime``
(each replica opens its own session, see :class:`~hem_bootstrap.model.onnx_path.OnnxDetector`);
``compile`` runs in the scan's process: its generated kernels are built for the parent's
OpenMP threads, which a fork does not carry.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from hem_bootstrap import errors
from hem_bootstrap.config import RuntimeConfig
from hem_bootstrap.data.tiles import collate_tiles
from hem_bootstrap.errors import HemError

REPLICA_PATHS = ("none", "channels_last", "bf16", "onnxruntime")
"""Fast paths a forked replica can run (see :mod:`hem_bootstrap.model.precision`)."""
MAX_AUTO_REPLICAS = 8
"""``auto`` starts at most this many replicas (``runtime.cpu_replicas`` asks for more)."""
MIN_TILES_PER_REPLICA = 64
"""``auto`` starts replicas only for scans of at least this many tiles per replica: a shorter scan
ends before forked replicas have warmed up (their first batches build the model's kernels again).
Measured on a 2-core Xeon (bf16, width 1.5), two replicas against the model in the scan's process:
25 tiles 0.36 s against 0.22-0.34 s, 81 tiles 0.77 s against 0.73 s, 196 tiles 1.57 s against 1.68 s."""


def replica_count(runtime: RuntimeConfig, device: torch.device, fast_path: str, n_tiles: int) -> int:
    """How many replicas a scan runs (each with one thread): 0 runs the model in the scan's process.

    ``runtime.cpu_replicas`` set: that many (0 or 1: none). Unset (``auto``): on a CPU, one per
    intra-op thread (at most :data:`MAX_AUTO_REPLICAS`) when there are at least two, no reader
    workers were asked for (``runtime.detect_workers``) and the scan is long enough; never on
    CUDA, never for a fast path a fork cannot carry, never where processes cannot be forked.
    Under torchrun this is per rank: ``auto`` sees the rank's threads (torchrun sets one per
    process unless ``OMP_NUM_THREADS`` or ``runtime.threads`` says otherwise).
    """
    if device.type != "cpu" or fast_path not in REPLICA_PATHS or "fork" not in multiprocessing.get_all_start_methods():
        return 0
    if runtime.cpu_replicas is not None:
        return runtime.cpu_replicas if runtime.cpu_replicas >= 2 else 0
    if runtime.detect_workers:
        return 0
    want = min(torch.get_num_threads(), MAX_AUTO_REPLICAS)
    return want if want >= 2 and n_tiles >= MIN_TILES_PER_REPLICA * want else 0


class _InReplica(Dataset):
    """What a replica fetches for a batch of tile indices: the tiles read, stacked and run; detections, not pixels.

    A :class:`~hem_bootstrap.errors.HemError` (a tile that cannot be read under
    ``data.on_bad_raster: fail``, a model that does not load in the replica) comes back as
    ``{"failed": (kind, message)}`` and is raised again, as the same kind, by the scan's process:
    one line, as if the model had run there.
    """

    def __init__(self, tiles: Dataset, run_batch: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.tiles = tiles
        self.run_batch = run_batch

    def __len__(self) -> int:
        return len(self.tiles)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        try:
            return self.run_batch(collate_tiles(self.tiles.__getitems__(indices)))  # type: ignore[attr-defined]
        except HemError as err:
            return {"failed": (type(err).__name__, str(err))}


def _as_is(batch: Any) -> Any:
    """The collate step of a replica's loader: its dataset already returns a whole batch."""
    return batch


def _start_replica(worker_id: int) -> None:
    """``worker_init_fn``: one intra-op thread, and stop signals left to the scan's process.

    One thread, always: torch's GNU OpenMP is not fork-safe, so a forked process that opens a
    parallel region of two or more threads after its parent has run one waits forever for
    pool threads that do not exist in it. SIGINT and SIGTERM (a Ctrl-C or a scheduler's
    stop reaches the whole process group) are the scan's process's to handle: it finishes
    the step and stops its replicas (see ``loop.graceful_signals``).
    """
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_RUNNING: weakref.WeakSet[Any] = weakref.WeakSet()
"""Replica loaders' iterators not yet stopped, for :func:`_stop_at_exit`."""
_AT_EXIT: list[bool] = []


def _stop_at_exit() -> None:
    """Stop every replica still running, before multiprocessing's own exit handler would.

    Replicas ignore SIGTERM, so the ``terminate`` that handler sends to daemonic children
    would not stop them and its ``join`` would wait forever: the case of a scan abandoned by
    an exception (a Ctrl-C while rows are written) whose generator is still alive at exit.
    """
    for batches in list(_RUNNING):
        stop_replicas(batches)


def replica_batches(dataset: Dataset, batch_size: int, replicas: int, prefetch: int,
                    run_batch: Callable[[dict[str, Any]], dict[str, Any]]) -> Iterator[Any]:
    """Batches of ``dataset`` run by ``replicas`` forked single-threaded workers, in order;
    ``run_batch`` turns a collated batch into what comes back (its detections, without the pixels).
    Stop them with :func:`stop_replicas` (at the latest, they are stopped at exit)."""
    if not _AT_EXIT:  # registered after multiprocessing's handler, so it runs before it
        atexit.register(_stop_at_exit)
        _AT_EXIT.append(True)
    batches = iter(_loader(dataset, batch_size, replicas, prefetch, run_batch))
    _RUNNING.add(batches)
    return batches


def _loader(dataset: Dataset, batch_size: int, replicas: int, prefetch: int,
            run_batch: Callable[[dict[str, Any]], dict[str, Any]]) -> DataLoader:
    return DataLoader(
        _InReplica(dataset, run_batch),
        batch_size=batch_size,
        shuffle=False,
        num_workers=replicas,
        collate_fn=_as_is,
        prefetch_factor=prefetch,
        persistent_workers=False,
        multiprocessing_context="fork",
        worker_init_fn=_start_replica,
    )


def raise_failed(batch: dict[str, Any]) -> None:
    """Raise a replica's failure in the scan's process, as the kind of error it was."""
    if "failed" in batch:
        kind, message = batch["failed"]
        cls = getattr(errors, kind, HemError)
        raise (cls if isinstance(cls, type) and issubclass(cls, HemError) else HemError)(message)


def stop_replicas(batches: Iterator[Any]) -> None:
    """Stop a replica loader's workers now (a scan that ends early, by an error or a consumer that
    stops reading, would otherwise keep them running ahead until the iterator is collected)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
    _RUNNING.discard(batches)
