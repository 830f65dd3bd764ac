"""Privacy: defences on what leaves a client, the accountant that reports their guarantee, and the
leakage audit that attacks a run's own traffic (see docs/privacy.md)."""
