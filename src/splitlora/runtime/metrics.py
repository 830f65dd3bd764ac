"""Run logs: ``metrics.jsonl`` (flushed per line, so nothing finished is lost), a CSV copy of the
step rows, and TensorBoard events when the ``tensorboard`` package is installed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` in order ([] when there is none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# A mean token cross-entropy above this was not computed by a model (a uniform guess over a 10^6-token
# vocabulary is 13.8): a client's report beyond it is left out of a logged loss, so that one forged value
# (1e308) cannot overflow every logged mean into null.
MAX_LOSS = 1e4


def plausible_loss(loss) -> bool:
    return loss is not None and math.isfinite(loss) and 0.0 <= loss <= MAX_LOSS


def _finite(value):
    """NaN and infinities are not JSON: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class MetricsLog:
    def __init__(self, out_dir: Path, append: bool = False):
        self.out_dir = out_dir
        self.jsonl = (out_dir / "metrics.jsonl").open("a" if append else "w")
        self.rows: list[dict] = []
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:  # tensorboard not installed: jsonl and CSV are the record
            self.tb = None

    def write(self, record: dict) -> None:
        record = {k: _finite(v) for k, v in record.items()}
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self.jsonl.flush()
        if "event" in record:
            return
        self.rows.append(record)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.jsonl.close()
        if self.rows:
            keys = list(dict.fromkeys(k for r in self.rows for k in r))
            with (self.out_dir / "metrics.csv").open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(self.rows)
        if self.tb is not None:
            self.tb.close()
