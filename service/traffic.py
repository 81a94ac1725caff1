"""Trusted traffic: which requests may move the deployment's class prior, and the rows each source has sent.

Only a request that carries a configured source's token in the ``Disalign-Traffic-Token`` header counts
towards the estimate (``DISALIGN_PRIOR_SOURCES``: source name → token and ``max_share``). A gateway in front
of the replicas sets the header for the traffic it vouches for (and drops any a client sent); any other
request is answered exactly as before and its rows are never looked at again. Tokens are compared in
constant time, as digests of equal length. A wrong token is untrusted traffic, not an error: answers never
depend on it.

Each source's rows (balanced probabilities, what the estimate needs) are kept in a ring buffer of its own,
of ``ceil(max_share × DISALIGN_PRIOR_WINDOW)`` rows: a source cannot crowd the others out of memory, and
its share of every estimate is capped again when the windows of all replicas are pooled
(:func:`disalign.calib.core.label_shift.capped_counts`). No HTTP here: the routers read the header.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading

import numpy as np

TOKEN_HEADER = "Disalign-Traffic-Token"
UNTRUSTED = "untrusted"  # the metrics' label for rows that count towards nothing


class TrafficSources:
    """The configured sources: who a token belongs to, and each source's largest share of an estimate."""

    def __init__(self, tokens: dict[str, str], max_share: dict[str, float]):
        self._digests = [(hashlib.sha256(token.encode()).digest(), name) for name, token in tokens.items()]
        self.max_share = dict(max_share)

    def __bool__(self) -> bool:
        return bool(self._digests)

    @property
    def names(self) -> list[str]:
        return [name for _, name in self._digests]

    def identify(self, token: str | None) -> str | None:
        """The source whose token this is, None for a missing or unknown one (every token compared, in constant time)."""
        if token is None or not self._digests:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        found = None
        for expected, name in self._digests:
            if secrets.compare_digest(digest, expected):
                found = name
        return found


class SourceWindow:
    """The most recent ``capacity`` rows (K float32 each) of one source, oldest overwritten first."""

    def __init__(self, capacity: int, num_classes: int):
        self.rows = np.empty((capacity, num_classes), np.float32)
        self.filled = 0
        self._next = 0

    def add(self, rows: np.ndarray) -> None:
        capacity = self.rows.shape[0]
        rows = rows[-capacity:]
        n = rows.shape[0]
        first = min(n, capacity - self._next)
        self.rows[self._next:self._next + first] = rows[:first]
        self.rows[:n - first] = rows[first:]
        self._next = (self._next + n) % capacity
        self.filled = min(capacity, self.filled + n)

    def snapshot(self) -> np.ndarray:
        """A copy of the rows held, oldest first (the estimate keeps a capped source's most recent rows)."""
        if self.filled < self.rows.shape[0]:
            return self.rows[:self.filled].copy()
        return np.concatenate([self.rows[self._next:], self.rows[:self._next]])


class TrafficWindows:
    """One :class:`SourceWindow` per source, for one calibration (K); guarded by its own lock."""

    def __init__(self, sources: TrafficSources, window: int, num_classes: int):
        self._lock = threading.Lock()
        self._windows = {name: SourceWindow(max(1, math.ceil(sources.max_share[name] * window)), num_classes)
                         for name in sources.names}

    def add(self, source: str, rows: np.ndarray) -> None:
        with self._lock:
            self._windows[source].add(rows)

    def snapshot(self) -> dict[str, np.ndarray]:
        with self._lock:
            return {name: w.snapshot() for name, w in self._windows.items() if w.filled}

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {name: w.filled for name, w in self._windows.items()}

    @property
    def rows(self) -> int:
        return sum(self.counts().values())

    @property
    def capacity(self) -> int:
        return sum(w.rows.shape[0] for w in self._windows.values())
