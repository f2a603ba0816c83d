"""The server's model threads and PyTorch's OpenMP thread pools: one pool per process.

PyTorch's CPU kernels (``at::parallel_for``, MKL's GEMMs) run on OpenMP, and OpenMP
(libgomp, which the PyTorch wheels use) keeps a separate pool of worker threads for EACH
thread that has started a parallel region. A thread's pool stays once made. As soon as
the pools hold more threads than the machine has cores, libgomp stops letting idle
workers spin between parallel regions ("throttled" spinning), so every one of the
thousands of small regions in a forward pass wakes its workers through the kernel.
Measured (SmolLM2, batches of 8 SST-2 rows, 2-core AMD EPYC Zen 3, median of 40
forwards on the inference thread): 495-533 ms with one pool; 672-710 ms, 1.35x slower,
once the main thread had run a single large tensor op before; elementwise kernels 2x
slower, GEMMs 1.26x (the torch profiler); ``OMP_WAIT_POLICY=ACTIVE`` made it 1,110 ms
(the other pool's idle worker then spins on a core). What created the second pool was
adding about 10 or more adapters at start-up on the main thread (the stacks' zero fill
goes parallel above PyTorch's grain of 32,768 elements): a 10-adapter server answered
10-25% fewer requests per second than a 1-adapter one whatever the traffic.

So the server keeps every parallel region on one thread:

* :func:`inference_executor`: the ONE model thread. It builds the backend (the base's
  weights and the adapters read at start-up: ``server.build_service``), runs every batch,
  and adds or removes adapters over HTTP; its intra-op threads are the caller's
  ``torch.get_num_threads()`` when it is made (``--threads``);
* :func:`loader_executor`: the adapter store's loader thread (reads adapters, writes
  them into free rows while a batch runs) runs its tensor work single-threaded, so it
  never makes a pool of its own (its copies are one adapter's rows and a head stack).

Each thread sets its own thread count once, first thing (after PyTorch's per-thread
lazy initialisation, which would otherwise reset it from the process-wide value that
``torch.set_num_threads`` on another thread last wrote).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch


def _threads(n: int) -> None:
    if torch.get_num_threads() != n:  # (PyTorch's lazy per-thread initialisation, first)
        torch.set_num_threads(n)


def inference_executor(threads: int | None = None) -> ThreadPoolExecutor:
    """The one model thread: its intra-op thread count ``threads`` (default: the calling
    thread's ``torch.get_num_threads()``)."""
    n = threads if threads is not None else torch.get_num_threads()
    return ThreadPoolExecutor(1, thread_name_prefix="loralens-infer", initializer=_threads,
                              initargs=(max(1, n),))


def loader_executor() -> ThreadPoolExecutor:
    """A thread for adapter reads and installs whose tensor work stays on it (one thread:
    no OpenMP pool of its own)."""
    return ThreadPoolExecutor(1, thread_name_prefix="loralens-load", initializer=_threads,
                              initargs=(1,))
