"""Rate counters for the per-socket limits (PROTOCOL.md 8), with no I/O and no clock of their own.

``RateWindow`` counts events in whole-second buckets over a sliding window and
says when their average rate is above a limit. ``TokenBucket`` bounds frames
and bytes as they arrive, before any decoding; its ``borrow`` paces rather than
refuses (the replicator's database broadcasts). The reference averages over
60 s in 5 s buckets per project; per socket a shorter window (5 s by default)
cuts a flood within seconds while still letting an ordinary client burst.
"""

from __future__ import annotations

from collections import deque


class RateWindow:
    """Events per second averaged over the last ``window`` whole seconds; a limit of 0 never trips."""

    __slots__ = ("limit", "window", "_buckets", "_total")

    def __init__(self, limit: float, window: int = 5) -> None:
        self.limit = limit
        self.window = max(1, window)
        self._buckets: deque[list[int]] = deque()  # [second, count], oldest first
        self._total = 0

    def hit(self, now: float, count: int = 1) -> bool:
        """Count ``count`` events at ``now``; True if the average is now above the limit."""
        if self.limit <= 0:
            return False
        second = int(now)
        buckets = self._buckets
        while buckets and buckets[0][0] <= second - self.window:
            self._total -= buckets.popleft()[1]
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += count
        else:
            buckets.append([second, count])
        self._total += count
        return self._total > self.limit * self.window


class TokenBucket:
    """Up to ``capacity`` at once, refilled at ``rate`` per second; a rate of 0 never runs dry."""

    __slots__ = ("rate", "capacity", "_tokens", "_at")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._at = now

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Take ``amount``; False if the bucket does not hold that much (nothing is taken then)."""
        if self.rate <= 0:
            return True
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < amount:
            return False
        self._tokens -= amount
        return True

    def borrow(self, now: float, amount: float) -> float:
        """Take ``amount`` even if the bucket runs into debt; the seconds to wait until the debt is paid.

        For pacing rather than refusing: the caller waits the returned time before going on, so
        ``amount``s taken this way average ``rate`` per second with bursts of at most ``capacity``.
        """
        if self.rate <= 0:
            return 0.0
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= amount
        return max(0.0, -self._tokens / self.rate)
