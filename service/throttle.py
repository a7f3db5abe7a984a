"""Failed logins per client: counted in a sliding window, then refused with 429 for a while.

In memory, per gateway process: a guesser is slowed down and shows up in the audit log;
a restart forgets the counts (which errs on the side of the legitimate user).
"""

from __future__ import annotations

import collections
import threading
import time

__all__ = ["LoginThrottle"]

_MAX_CLIENTS = 10000  # bounded memory under a spray of source addresses


class LoginThrottle:
    """``limit`` failures within ``window_s`` from one client block it until the oldest ages out."""

    def __init__(self, limit: int, window_s: float, clock=time.monotonic):
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._failures: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> collections.deque:
        q = self._failures.get(client)
        if q is None:
            if len(self._failures) >= _MAX_CLIENTS:
                self._prune(now)
            q = self._failures.setdefault(client, collections.deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def _prune(self, now: float) -> None:
        for key in [k for k, q in self._failures.items() if not q or q[-1] <= now - self.window_s]:
            del self._failures[key]
        while len(self._failures) >= _MAX_CLIENTS:  # still full: forget the oldest client
            del self._failures[next(iter(self._failures))]

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None when it is not blocked."""
        now = self.clock()
        with self._lock:
            q = self._recent(client, now)
            if len(q) < self.limit:
                return None
            return max(1, int(q[0] + self.window_s - now + 0.999))

    def failed(self, client: str) -> int:
        """Count a failure; returns the failures of ``client`` in the window."""
        now = self.clock()
        with self._lock:
            q = self._recent(client, now)
            q.append(now)
            return len(q)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)
