"""Privacy: defences on what leaves a client, DP-SGD of the released adapter and its accountant, secure
aggregation of client adapters, the ``--privacy`` presets, and the audits that attack a run's own
traffic (leakage) and its released adapter (canaries); see docs/privacy.md."""
