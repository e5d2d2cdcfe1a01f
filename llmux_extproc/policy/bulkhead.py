"""Bulkheads: a concurrency cap per deployment (LiteLLM's `max_parallel_requests`), exact
across the worker processes of one gateway.

Envoy's circuit breakers cap a whole cluster (a model group), not one endpoint, so the cap
per deployment is kept here: a small file in the runtime directory, mapped by every worker,
holds for each capped deployment one in-flight count per worker. A worker changes only its
own counts, and admission sums every worker's under an exclusive `flock`, so two workers
never both take the last place. A restarted worker clears its counts first: what its
predecessor held died with it. Only deployments with a cap pay for it (two syscalls per
attempt).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from pathlib import Path

_SLOTS = 256  # capped deployments per gateway; more than any config has
_KEY = struct.Struct("<Q")


def _key(deployment: str) -> int:
    # 0 marks a free slot.
    return int.from_bytes(hashlib.blake2b(deployment.encode(), digest_size=8).digest()) or 1


class Bulkhead:
    def __init__(self, path: Path, worker: int, workers: int) -> None:
        self.worker = worker
        self.workers = workers
        self._record = _KEY.size + 4 * workers
        size = self._record * _SLOTS
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with self._locked():
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)
            for slot in range(_SLOTS):  # this worker's counts start at zero
                self._set(slot, self.worker, 0)

    def _locked(self) -> _Lock:
        return _Lock(self._fd)

    def _count_at(self, slot: int, worker: int) -> int:
        offset = slot * self._record + _KEY.size + 4 * worker
        return int.from_bytes(self._map[offset : offset + 4], "little")

    def _set(self, slot: int, worker: int, value: int) -> None:
        offset = slot * self._record + _KEY.size + 4 * worker
        self._map[offset : offset + 4] = value.to_bytes(4, "little")

    def _slot(self, deployment: str, create: bool) -> int | None:
        key = _key(deployment)
        start = key % _SLOTS
        for i in range(_SLOTS):
            slot = (start + i) % _SLOTS
            offset = slot * self._record
            (found,) = _KEY.unpack_from(self._map, offset)
            if found == key:
                return slot
            if found == 0:
                if not create:
                    return None
                _KEY.pack_into(self._map, offset, key)
                return slot
        raise RuntimeError("bulkhead table full")

    def in_flight(self, deployment: str) -> int:
        with self._locked():
            slot = self._slot(deployment, create=False)
            if slot is None:
                return 0
            return sum(self._count_at(slot, w) for w in range(self.workers))

    def acquire(self, deployment: str, cap: int) -> bool:
        """Take a place for one attempt; False when `cap` attempts are already in flight."""
        with self._locked():
            slot = self._slot(deployment, create=True)
            assert slot is not None
            total = sum(self._count_at(slot, w) for w in range(self.workers))
            if total >= cap:
                return False
            self._set(slot, self.worker, self._count_at(slot, self.worker) + 1)
            return True

    def release(self, deployment: str) -> None:
        with self._locked():
            slot = self._slot(deployment, create=False)
            if slot is not None:
                mine = self._count_at(slot, self.worker)
                self._set(slot, self.worker, max(0, mine - 1))


class _Lock:
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
