"""Per-AccessKey request rate limit (token bucket, per process).

With several replicas each one enforces the limit on its own share of the traffic, so the
fleet-wide ceiling is `replicas x rate`; documented in the README.
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    def __init__(self, rate_per_second: float, burst: int = 0):
        self.rate = rate_per_second
        self.capacity = float(burst or max(1, int(rate_per_second)))
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, key: str) -> bool:
        if not self.enabled:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1.0, now)
            return True
