"""``python -m benchmarks NAME``: a thin wrapper; the code is ``splitlora.bench`` (installed with the package)."""
