"""Warnings rate-limited per client and per cause: a client that gets refused thousands of times a
second must not flood the server's log (4,613 lines in 35 s, one per refused call, before this)."""

from __future__ import annotations

import logging
import threading


class Throttled:
    """``warning(client, cause, fmt, *args)`` logs the 1st, 2nd, 4th, 8th, ... occurrence of each
    ``(client, cause)``, each with its count so far. At most ``max_keys`` pairs are told apart (an
    attacker can invent client names); beyond that they share one count."""

    def __init__(self, logger: logging.Logger, max_keys: int = 1024):
        self.log, self.max_keys = logger, max_keys
        self.counts: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def warning(self, client: str, cause: str, fmt: str, *args) -> None:
        key = (client, cause)
        with self.lock:
            if key not in self.counts and len(self.counts) >= self.max_keys:
                key = ("(others)", cause)
            n = self.counts[key] = self.counts.get(key, 0) + 1
        if n & (n - 1) == 0:  # a power of two
            self.log.warning(fmt + (f" [{n} times so far]" if n > 1 else ""), *args)
