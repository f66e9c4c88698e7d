"""Time-ordered message ids: UUID version 7 (RFC 9562 §5.7), monotonic per process."""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last = 0


def uuid7() -> uuid.UUID:
    """48 bits of Unix milliseconds, then random bits; strictly increasing in this process.

    Within one millisecond the previous value is incremented (RFC 9562
    method 3, "replace leftmost random bits with increased clock precision"
    folded into a counter), so ids taken one after another sort in that order.
    """
    global _last
    with _lock:
        ms = time.time_ns() // 1_000_000
        # 122 significant bits: the milliseconds, then 74 random bits
        candidate = (ms << 74) | (int.from_bytes(os.urandom(10), "big") >> 6)
        value = max(candidate, _last + 1)
        _last = value
    ms_part = value >> 74
    rand_a = (value >> 62) & 0xFFF
    rand_b = value & ((1 << 62) - 1)
    # layout: unix_ts_ms(48) | version 7 (4) | rand_a(12) | variant 0b10 (2) | rand_b(62)
    return uuid.UUID(int=(ms_part << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b)
