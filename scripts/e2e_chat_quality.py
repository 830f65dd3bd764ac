"""Does the chat template help the instruct model? E2E as conversations vs the plain prompt.

    python scripts/e2e_chat_quality.py --out /tmp/chatq [--steps 20 --test-mrs 50]

Training rows: ../shared/data/e2e/devset.csv, as the plain E2E prompt (``{mr}\\nDescription:``) and as
a conversation (user: the MR, assistant: the reference) through SmolLM2-Instruct's chat template.
``splitlora`` (2 clients x batch 4) and ``cen`` (batch 8) see the same samples. The first
``--test-mrs`` MRs of testset_w_refs.csv are decoded greedily (the chat runs: the MR rendered as a user
turn plus the generation prompt) and every output is scored with the project's E2E scorer against all
of that MR's references (BLEU, ROUGE-L as measure_scores.py computes them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

E2E = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "e2e"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--test-mrs", type=int, default=50)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores other work leaves free)")
    args = ap.parse_args(argv)
    from splitlora.config import RunConfig
    from splitlora.data.e2e import read_e2e_csv
    from splitlora.eval.generate import evaluate_run
    from splitlora.eval.metrics import load_e2e_references, score_corpus
    from splitlora.simulation.run import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chat_train = out / "devset-chat.jsonl"
    with chat_train.open("w", encoding="utf-8") as fh:
        for ex in read_e2e_csv(E2E / "devset.csv"):
            fh.write(json.dumps({"messages": [{"role": "user", "content": ex.mr},
                                              {"role": "assistant", "content": ex.ref}]}) + "\n")
    mrs, refs = load_e2e_references(E2E / "testset_w_refs.csv")
    mrs, refs = mrs[:args.test_mrs], refs[:args.test_mrs]
    chat_test = out / "test-chat.jsonl"
    with chat_test.open("w", encoding="utf-8") as fh:
        for mr, group in zip(mrs, refs):
            fh.write(json.dumps({"messages": [{"role": "user", "content": mr},
                                              {"role": "assistant", "content": group[0]}]}) + "\n")
    common = dict(model=args.model, steps=args.steps, max_length=128, lr=1e-3, warmup_steps=6, val_fraction=0.01,
                  client_lora={"rank": 4, "alpha": 32.0, "dropout": 0.1},
                  server_lora={"rank": 4, "alpha": 32.0, "dropout": 0.1}, threads=args.threads)
    algos = {"splitlora": dict(algorithm="splitlora", clients=2, batch_size=4, aggregate_every=5),
             "cen": dict(algorithm="cen", clients=2, batch_size=8)}
    results = []
    for fmt, data in (("plain", str(E2E / "devset.csv")), ("chat", str(chat_train))):
        for name, extra in algos.items():
            cfg = RunConfig.from_dict({**common, **extra, "data": data})
            run = out / f"{fmt}-{name}"
            t0 = time.perf_counter()
            trained = train(cfg, run, progress=False)
            seconds_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            if fmt == "plain":
                evaluate_run(run, data=str(E2E / "testset_w_refs.csv"), limit=args.test_mrs, beams=1,
                             max_new_tokens=64, batch_size=16, progress=False, show=False)
                hyps = (run / "predictions.txt").read_text(encoding="utf-8").splitlines()
            else:
                evaluate_run(run, data=str(chat_test), beams=1, max_new_tokens=64, batch_size=16, progress=False,
                             show=False)
                hyps = [json.loads(line)["prediction"] for line in (run / "predictions.jsonl").read_text().splitlines()]
            scores = score_corpus(hyps, refs)
            row = {"format": fmt, "algorithm": name, "samples": args.steps * 8, "first_loss": trained.first_loss,
                   "last_loss": trained.last_loss, "bleu": 100 * scores["bleu"], "rouge_l": 100 * scores["rouge_l"],
                   "seconds_train": round(seconds_train), "seconds_eval": round(time.perf_counter() - t0),
                   "example": hyps[0]}
            results.append(row)
            print(json.dumps(row), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
