"""Wall time and peak memory of loading, tokenising and partitioning a generated JSONL (docs/data.md).

    python scripts/measure_data.py --rows 1000000 --shape prompt-completion --dir /tmp/rows

One process per size (peak RSS is per process). The GPT-2 BPE tokenizer (fast), 10 sites
partitioned with ``column:site``, ``val_fraction`` 0.05 of the distinct prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import threading
import time
from pathlib import Path


def generate(path: Path, rows: int, shape: str, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = "patient reports mild pain fever since two days no allergy prescribed rest fluids review".split()
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            question = f"Note {i}: " + " ".join(rng.choices(words, k=12))
            answer = " ".join(rng.choices(words, k=16))
            row = ({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
                   if shape == "messages" else {"prompt": question, "completion": " " + answer})
            row["site"] = f"site-{i % 10}"
            fh.write(json.dumps(row) + "\n")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler(threading.Thread):
    """Peaks of anonymous (heap) and file-backed (memory-mapped Arrow) resident memory, every 0.2 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.done = threading.Event()

    def sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]) // 1024)

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.sample()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--shape", choices=("prompt-completion", "messages"), default="prompt-completion")
    ap.add_argument("--dir", default="/tmp/splitlora-measure")
    args = ap.parse_args(argv)
    from splitlora.config import RunConfig
    from splitlora.models.loading import gpt2_tokenizer
    from splitlora.data import prepare_data

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{args.shape}-{args.rows}.jsonl"
    if not path.is_file():
        generate(path, args.rows, args.shape)
    tok = gpt2_tokenizer()
    chat = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    cfg = RunConfig.from_dict({"model": "tiny-gpt2", "data": str(path), "clients": 10, "partition": "column:site",
                               "max_length": 96, "data_format": {"chat_template": chat}})
    base = peak_rss_mib()
    sampler = RssSampler()
    sampler.sample()
    anon_before = sampler.peak["RssAnon"]
    sampler.start()
    t0 = time.perf_counter()
    data = prepare_data(cfg, tok)
    seconds = time.perf_counter() - t0
    sampler.done.set()
    sampler.sample()
    print(json.dumps({"rows": args.rows, "shape": args.shape, "file_mib": round(path.stat().st_size / 2**20, 1),
                      "seconds": round(seconds, 1), "rows_per_s": round(args.rows / seconds),
                      "peak_rss_mib": round(peak_rss_mib()), "rss_before_mib": round(base),
                      "peak_anon_mib": sampler.peak["RssAnon"], "anon_before_mib": anon_before,
                      "peak_file_mib": sampler.peak["RssFile"],
                      "train": len(data.train), "val": len(data.val),
                      "clients": [len(ix) for ix in data.client_indices][:3]}))


if __name__ == "__main__":
    main()
