"""An adapter store with a memory budget, for the lean runtime (``--backend ours``).

The registry knows every adapter (name -> directory); at most ``max_loaded`` of them have
their factors and head in the runtime's stacks (:class:`MultiLoraClassifier`); the others
are read from disk when a request names them, the least recently used loaded adapter out.

Who does what (the server's threads):

* the event loop counts a request's hit or miss and, on a miss, starts ONE load per adapter
  (later requests for the same adapter await that load);
* a loader thread reads the adapter (safetensors, tensor preparation: :meth:`prepare`), so
  neither the event loop nor the inference worker waits for the disk, and then, on the same
  thread, writes it into the stacks while the worker's current batch runs
  (:meth:`install_now`): into rows no adapter uses (an evicted adapter's, or reserved ones),
  evicting least recently used adapters, never one of the running batch's (the runtime's
  ``busy``), one a queued request names (pins) only when every other is pinned; the name
  published (``lru``) only once its rows and head are
  written, so the next batch the worker forms can use it;
* when that is not possible without touching what the running batch reads (every loaded
  adapter is the running batch's, or a stack would have to grow: a new tensor, or a
  projection no adapter adapted yet would be replaced), the inference worker swaps it in between
  batches instead (:meth:`install`, the wait-for-batch path; a debug log line says why);
  only there, when every loaded adapter is pinned, does it evict a pinned one, and the batch
  that needs it reloads it (:meth:`ensure` on the worker, a correct but slower path);
* a batch naming more distinct adapters than the budget runs in groups of at most
  ``max_loaded`` distinct adapters (:func:`groups`), each group loaded and then run.

Counters (``stats``): hits and misses (per request, when it arrives), loads (reads from
disk into the stacks), evictions; ``on_load(seconds)`` is called after each load (the
server's load-latency histogram, ``loralens_adapter_store_load_seconds``) with the LOAD
LATENCY: from the miss (``started``: the server takes it when the first request naming the
adapter finds it not loaded, before the read is queued on the loader thread) to the adapter
usable by the next batch the worker forms (its rows written and its name published in
``lru``, under the locks). It includes the wait for the loader thread, the read, eviction
and install, and on the wait-for-batch path the wait for the running batch; it excludes the
request's own wait for a batch and that batch's forward (the cold request's end-to-end
latency adds those).

Every change to the runtime's adapters holds the runtime's ``lock`` (the worker's forward
takes it only to set up a batch), so the loader's installs and the worker's never
interleave.
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from loralens.serving.runtime import LoraAdapter, MultiLoraClassifier

log = logging.getLogger(__name__)


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


class AdapterStore:
    """Registry of known adapters plus the LRU set of loaded ones in ``rt``.

    ``max_loaded``: the budget (None: no limit, every registered adapter stays loaded).
    ``load_hook(name)``: called on the loader thread before an adapter is read (tests inject
    a delay there).
    """

    def __init__(self, rt: MultiLoraClassifier, max_loaded: int | None = None,
                 load_hook: Callable[[str], None] | None = None):
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1 (got {max_loaded})")
        self.rt = rt
        self.max_loaded = max_loaded
        self.load_hook = load_hook
        self.on_load: Callable[[float], None] | None = None
        self.known: dict[str, Path] = {}
        self.lru: OrderedDict[str, None] = OrderedDict()  # loaded names, least recent first
        self.pins: Counter = Counter()  # name -> requests queued or running for it
        self.stats = StoreStats()
        self._lock = threading.Lock()
        # the adapters of the worker's next (or current) group, from ensure() on: not evicted
        # by the loader between ensure() and the forward's set-up (then the runtime's busy)
        self.claimed: frozenset[str] = frozenset()

    # ---- registry
    def register(self, name: str, path: str | Path, adapter: LoraAdapter | None = None) -> None:
        """Know ``name``; load it now when ``adapter`` is given and the budget has room."""
        with self.rt.lock:  # the loader may install meanwhile: check and put at once
            self.known[name] = Path(path)
            if adapter is not None and (self.max_loaded is None
                                        or len(self.lru) < self.max_loaded):
                self._put(name, adapter)

    def reserve(self, paths: Iterable[str | Path]) -> dict[int, int]:
        """Tell the runtime how many adapters of each rank to expect from the adapter
        directories ``paths`` (their adapter_config.json's ``r`` only; an unreadable one is
        skipped: adding it reports the error), so that each rank's stacks are allocated once
        rather than grown (:meth:`MultiLoraClassifier.reserve`). With a budget, a rank's count
        is capped at ``max_loaded``, and nothing is reserved when several ranks share the
        budget (which of them will be loaded is not known: the stacks grow as needed).
        Returns the reservation."""
        counts: Counter = Counter()
        for path in paths:
            try:
                counts[int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])] += 1
            except (OSError, ValueError, KeyError, TypeError):
                continue
        if self.max_loaded is not None:
            counts = Counter({r: min(n, self.max_loaded) for r, n in counts.items()}
                             if len(counts) == 1 else {})
        self.rt.reserve(counts)
        return dict(counts)

    def forget(self, name: str) -> None:
        """Unregister (and unload) ``name``."""
        with self.rt.lock:
            if name in self.lru:
                self.rt.remove_adapter(name)
                with self._lock:
                    del self.lru[name]
            self.known.pop(name, None)

    def is_loaded(self, name: str) -> bool:
        return name in self.lru

    @property
    def loaded(self) -> list[str]:
        return list(self.lru)

    def bytes_held(self) -> int:
        return self.rt.bytes_held()

    # ---- requests (event loop)
    def count(self, name: str) -> bool:
        """Count a request's hit (True: loaded now) or miss, and mark it recently used."""
        with self._lock:
            hit = name in self.lru
            if hit:
                self.lru.move_to_end(name)
                self.stats.hits += 1
            else:
                self.stats.misses += 1
        return hit

    def pin(self, name: str) -> None:
        with self._lock:
            self.pins[name] += 1

    def unpin(self, name: str) -> None:
        with self._lock:
            self.pins[name] -= 1
            if self.pins[name] <= 0:
                del self.pins[name]

    # ---- loading
    def prepare(self, name: str) -> LoraAdapter:
        """Read ``name`` from disk (loader thread; touches no shared state)."""
        if self.load_hook is not None:
            self.load_hook(name)
        path = self.known.get(name)
        if path is None:
            raise KeyError(name)
        return LoraAdapter.from_dir(path)

    def install(self, name: str, adapter: LoraAdapter, keep: Iterable[str] = (),
                started: float | None = None) -> bool:
        """Swap a prepared adapter into the stacks (inference worker, between batches),
        evicting least recently used adapters first: unpinned ones not in ``keep``, then,
        when there are none, pinned ones not in ``keep``. False when ``name`` was
        unregistered meanwhile (or registered again from another directory), or is loaded
        already."""
        with self.rt.lock:
            if not self._wanted(name, adapter):
                return False
            self._make_room(set(keep) | {name})
            self._put(name, adapter)
            self._loaded(started)
        return True

    def install_now(self, name: str, adapter: LoraAdapter,
                    started: float | None = None) -> bool | None:
        """Swap a prepared adapter into the stacks now, on the calling thread (the loader),
        even while the worker runs a batch: evicting least recently used adapters as
        :meth:`install` does (unpinned ones first; a queued request's adapter only when every
        other is pinned: its batch then reloads it) but never one of the running batch's (the
        runtime's ``busy``: its rows are being read) nor of the group the worker has made
        ready for its next forward (``claimed``, from :meth:`ensure`), and, while a batch
        runs, only when the adapter fits rows already free
        (:meth:`MultiLoraClassifier.in_place_problem`: no stack grows or shrinks, no row the
        batch reads is written). True: installed (usable by the next batch); False: as
        :meth:`install` (unregistered, moved, or loaded already); None: not possible now
        (logged at debug level): :meth:`install` it on the worker, between batches."""
        rt = self.rt
        with rt.lock:
            if not self._wanted(name, adapter):
                return False
            need = self._need()
            victims = self._victims(need, rt.busy | self.claimed)
            if len(victims) < need:
                log.debug("adapter %s: every loaded adapter is the running or next batch's; "
                          "installing it between batches", name)
                return None
            problem = rt.in_place_problem(adapter, victims) if rt.running else None
            if problem is not None:
                log.debug("adapter %s: %s; installing it between batches", name, problem)
                return None
            for victim in victims:
                self._evict(victim)
            self._put(name, adapter)
            self._loaded(started)
        return True

    def _wanted(self, name: str, adapter: LoraAdapter) -> bool:
        path = self.known.get(name)
        return path is not None and name not in self.lru and adapter.source == str(path)

    def _loaded(self, started: float | None) -> None:
        self.stats.loads += 1
        if self.on_load is not None and started is not None:
            self.on_load(time.perf_counter() - started)

    def ensure(self, names: Sequence[str]) -> None:
        """Every one of ``names`` (at most ``max_loaded`` distinct) loaded, reading missing
        ones on the calling thread (the worker's fallback after an eviction)."""
        group = list(dict.fromkeys(names))
        if self.max_loaded is not None and len(group) > self.max_loaded:
            raise ValueError(f"{len(group)} adapters in one group; the budget is "
                             f"{self.max_loaded}")
        with self.rt.lock:
            self.claimed = frozenset(group)
        for name in group:
            if name in self.lru:
                with self._lock:
                    self.lru.move_to_end(name)
                continue
            t0 = time.perf_counter()
            self.install(name, self.prepare(name), keep=group, started=t0)

    def _need(self) -> int:
        """How many loaded adapters must go before one more fits the budget."""
        return 0 if self.max_loaded is None else max(0, len(self.lru) + 1 - self.max_loaded)

    def _victims(self, need: int, exclude) -> list[str]:
        """The ``need`` adapters to evict (fewer where there are not as many): least recently
        used first, unpinned ones before pinned ones (a queued request's), none of
        ``exclude``."""
        with self._lock:
            idle = [n for n in self.lru if n not in exclude]
            return ([n for n in idle if not self.pins.get(n)]
                    + [n for n in idle if self.pins.get(n)])[:need]

    def _make_room(self, keep: set[str]) -> None:
        need = self._need()
        victims = self._victims(need, keep)
        if len(victims) < need:
            raise RuntimeError("adapter store: nothing to evict")  # keep > budget: a bug
        for victim in victims:
            self._evict(victim)

    def _evict(self, victim: str) -> None:
        with self.rt.lock:
            self.rt.remove_adapter(victim)
            with self._lock:
                del self.lru[victim]
            self.stats.evictions += 1
        log.debug("evicted adapter %s", victim)

    def _put(self, name: str, adapter: LoraAdapter) -> None:
        with self.rt.lock:
            self.rt.add_adapter(name, adapter)  # rows and head written, then published:
            with self._lock:
                self.lru[name] = None


def groups(names: Sequence[str], limit: int | None) -> list[list[int]]:
    """Row indices of ``names`` split into groups naming at most ``limit`` distinct adapters,
    in order of first appearance (one group when ``limit`` is None or not exceeded)."""
    order = list(dict.fromkeys(names))
    if limit is None or len(order) <= limit:
        return [list(range(len(names)))]
    which = {n: i // limit for i, n in enumerate(order)}
    out: list[list[int]] = [[] for _ in range((len(order) + limit - 1) // limit)]
    for i, n in enumerate(names):
        out[which[n]].append(i)
    return out


def trim_heap() -> bool:
    """Hand the C heap's free memory back to the OS (glibc's ``malloc_trim(0)``; False where
    there is none). After many adapters are read at start-up, the tensors read and freed
    leave free heap pages that glibc would otherwise keep in the process's RSS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True
