"""``splitlora eval`` / ``score``: decoding a trained tiny run, its outputs and scores, and the CLI's errors."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from splitlora.config import RunConfig
from splitlora.errors import UserError
from splitlora.eval.generate import (evaluate_run, generate, load_adapted, reference_perplexity, resolve_data,
                                     synthetic_eval_set)
from splitlora.simulation.run import train

E2E = Path(__file__).resolve().parents[2] / "shared/data/e2e"
KEYS = {"bleu", "nist", "meteor", "rouge_l", "cider", "perplexity", "perplexity_note", "n_mrs", "n_refs", "beams",
        "seconds_generate", "seconds_perplexity", "seconds_score", "data", "split"}


# What these tests check is the plumbing: they score without Java (conftest.no_java).
pytestmark = pytest.mark.usefixtures("no_java")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # 60 synthetic examples, 10% held out: 6 validation MRs, so --limit 4 really cuts
    cfg = RunConfig(model="tiny-gpt2", steps=3, batch_size=2, clients=2, cut_layer=2, synthetic_examples=60,
                    val_fraction=0.1, max_length=64, warmup_steps=0)
    result = train(cfg, out, progress=False)
    return out, result


@pytest.fixture(scope="module")
def adapted(run):
    out, _ = run
    cfg = RunConfig.load(out / "config.yaml")
    model, tok = load_adapted(out, cfg, progress=False)
    return cfg, model, tok


def test_evaluate_run_writes_predictions_and_scores(run):
    out, _ = run
    result = evaluate_run(out, limit=4, beams=2, progress=False, max_new_tokens=8, show=False)
    lines = (out / "predictions.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == 4  # one line per MR, newline-terminated
    saved = json.loads((out / "eval.json").read_text())
    assert set(saved) == KEYS and saved == result
    assert saved["n_mrs"] == 4 and saved["n_refs"] >= 4 and saved["beams"] == 2
    assert saved["data"] == "synthetic" and saved["split"] == "test"
    assert saved["perplexity"] is None and "--perplexity" in saved["perplexity_note"]  # off by default
    for key in ("bleu", "nist", "rouge_l", "cider"):
        assert math.isfinite(saved[key])


def test_perplexity_only_on_request(run):
    out, result = run
    on = evaluate_run(out, limit=4, beams=1, progress=False, max_new_tokens=4, show=False, perplexity=True)
    assert set(on) == KEYS and on["perplexity_note"] is None
    assert math.isfinite(on["perplexity"]) and on["perplexity"] > 1
    assert on["seconds_perplexity"] > 0
    off = evaluate_run(out, limit=4, beams=1, progress=False, max_new_tokens=4, show=False)
    assert off["perplexity"] is None and off["seconds_perplexity"] < on["seconds_perplexity"]
    assert {k: off[k] for k in ("bleu", "nist", "rouge_l", "cider")} == {k: on[k] for k in ("bleu", "nist", "rouge_l", "cider")}


def test_eval_cli_perplexity_flag(run, tmp_path):
    out, _ = run
    args = ("eval", "--run", str(out), "--limit", "2", "--beams", "1", "--max-new-tokens", "3", "--quiet")
    off = _cli(*args, cwd=tmp_path)
    assert off.returncode == 0, off.stderr
    assert json.loads((out / "eval.json").read_text())["perplexity"] is None
    assert "splitlora eval --perplexity" in off.stdout
    on = _cli(*args, "--perplexity", cwd=tmp_path)
    assert on.returncode == 0, on.stderr
    assert json.loads((out / "eval.json").read_text())["perplexity"] > 1


def test_perplexity_is_the_training_validation_loss(run, adapted):
    # the PEFT-loaded adapter scores the held-out references exactly as training's validator did
    _, result = run
    cfg, model, tok = adapted
    evalset = synthetic_eval_set(cfg, tok)
    assert len(evalset.mrs) == 6
    ppl = reference_perplexity(model, tok, cfg, evalset.examples())
    assert ppl == pytest.approx(math.exp(result.val_loss), rel=1e-4)


@pytest.mark.parametrize("beams", [1, 2])
def test_batched_generation_is_padding_free_and_deterministic(adapted, beams):
    cfg, model, tok = adapted
    prompts = [cfg.prompt_template.format(mr=mr) for mr in synthetic_eval_set(cfg, tok).mrs[:4]]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1  # the batch really is left-padded
    batched = generate(model, tok, prompts, beams=beams, max_new_tokens=6, batch_size=4, progress=False)
    alone = generate(model, tok, prompts, beams=beams, max_new_tokens=6, batch_size=1, progress=False)
    again = generate(model, tok, prompts, beams=beams, max_new_tokens=6, batch_size=4, progress=False)
    assert batched == alone == again
    # sorted by length (the default) or not, batches of 2 hold different rows: the same outputs, in input order
    unsorted = generate(model, tok, prompts, beams=beams, max_new_tokens=6, batch_size=2, progress=False,
                        sort_by_length=False)
    by_length = generate(model, tok, prompts, beams=beams, max_new_tokens=6, batch_size=2, progress=False)
    reverse = generate(model, tok, prompts[::-1], beams=beams, max_new_tokens=6, batch_size=2, progress=False)
    assert unsorted == by_length == alone and reverse == alone[::-1]
    assert all("\n" not in h and h == h.strip() for h in batched)
    assert tok.padding_side == "right"  # restored for training-style encoding


def test_resolve_data(tmp_path):
    (tmp_path / "testset_w_refs.csv").write_text("mr,ref\na[1],x\n")
    (tmp_path / "devset.csv").write_text("mr,ref\nb[1],y\n")
    train_file = tmp_path / "trainset.csv"
    train_file.write_text("mr,ref\nc[1],z\n")
    assert resolve_data("synthetic", None, "test") == "synthetic"
    assert resolve_data(str(train_file), "synthetic", "test") == "synthetic"
    assert resolve_data("synthetic", str(tmp_path), "test") == tmp_path / "testset_w_refs.csv"
    assert resolve_data("synthetic", str(tmp_path), "dev") == tmp_path / "devset.csv"
    assert resolve_data(str(tmp_path), None, "dev") == tmp_path / "devset.csv"
    assert resolve_data("synthetic", str(train_file), "test") == train_file  # an explicit file: as is
    assert resolve_data(str(train_file), None, "test") == tmp_path / "testset_w_refs.csv"  # next to it
    with pytest.raises(UserError):
        resolve_data("synthetic", str(tmp_path / "sub"), "train")
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match="testset_w_refs.csv"):
        resolve_data("synthetic", str(tmp_path / "sub"), "test")


# ---- the command line ------------------------------------------------------------------------------

def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    from conftest import cli_in_process

    return cli_in_process(*args, cwd=cwd)


def _one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr


def test_score_errors(tmp_path):
    refs = tmp_path / "refs.csv"
    refs.write_text("mr,ref\nname[A],A is nice.\nname[A],A is a place.\nname[B],B is nice.\n")
    (tmp_path / "three.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nocols.csv").write_text("meaning,text\nname[A],A is nice.\n")
    (tmp_path / "two.txt").write_text("A is nice.\nB is nice.\n")
    _one_line_error(_cli("score", "--refs", "refs.csv", "--hyp", "three.txt", cwd=tmp_path), "2 MRs")
    _one_line_error(_cli("score", "--refs", "refs.csv", "--hyp", "empty.txt", cwd=tmp_path), "empty")
    _one_line_error(_cli("score", "--refs", "nocols.csv", "--hyp", "two.txt", cwd=tmp_path), "'mr'")
    _one_line_error(_cli("eval", "--run", "no-such-run", cwd=tmp_path), "no-such-run")


@pytest.mark.skipif(not (E2E / "testset_w_refs.csv").is_file(), reason="E2E data not present")
def test_score_real_system_output():
    proc = _cli("score", "--refs", str(E2E / "testset_w_refs.csv"), "--hyp",
                str(E2E / "system-outputs/tgen-std.txt"), cwd=E2E)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(scores) == {"bleu", "nist", "meteor", "rouge_l", "cider", "n"} and scores["meteor"] is None
    assert scores["n"] == 630
    assert 0.6 < scores["bleu"] < 0.7 and 8 < scores["nist"] < 9  # TGen: BLEU 0.66, NIST 8.5
