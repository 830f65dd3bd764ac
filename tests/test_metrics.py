"""Tests for the E2E scorer (splitlora.eval.metrics).

The small cases are worked out by hand in the comments. Each expected value was also checked
against a Perl transcription of mteval-v13a-sig.pl (BLEU, NIST) and against pycocoevalcap's own
COCO pipeline (ROUGE-L, CIDEr). The real-data tests need ../shared/data/e2e, and the METEOR and
Java-tokenizer ones need Java. Each skips without them.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from pathlib import Path

import pytest

from splitlora.errors import UserError
from splitlora.eval import metrics as M

E2E = Path(__file__).resolve().parents[1].parent / "shared/data/e2e"
HAS_JAVA = shutil.which("java") is not None
needs_data = pytest.mark.skipif(not E2E.is_dir(), reason=f"E2E data not found at {E2E}")
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="java not on PATH")

# NIST length-penalty constant: a ratio of 1.5 (or 1/1.5) halves the score.
BETA = math.log(2) / math.log(1.5) ** 2


def nist_lp(ratio: float) -> float:
    return 1.0 if ratio >= 1 else math.exp(-BETA * math.log(ratio) ** 2)


# --- BLEU ---------------------------------------------------------------------------------------


def test_bleu_identical_is_one():
    hyps = ["Blue Spice is a coffee shop in the city centre.", "The Mill is a pub."]
    assert M.corpus_bleu(hyps, [[h] for h in hyps]) == pytest.approx(1.0)


def test_bleu_worked_example_with_mteval_smoothing():
    # hyp: the cat sat on the mat  /  ref: the cat is on the mat   (6 tokens each, BP = 1)
    # 1-grams: the x2, cat, on, mat match -> 5/6. 2-grams: the cat, on the, the mat -> 3/5.
    # 3-grams: on the mat -> 1/4. 4-grams: none of 3 match, so mteval smooths to 1/(2*3).
    # BLEU = (5/6 * 3/5 * 1/4 * 1/6) ** (1/4) = 0.0208333 ** 0.25 = 0.379918
    score = M.corpus_bleu(["the cat sat on the mat"], [["the cat is on the mat"]])
    assert score == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)
    assert score == pytest.approx(0.379918, abs=1e-6)


def test_bleu_brevity_penalty():
    # All n-gram precisions are 1. hyp has 4 tokens, ref has 6: BP = exp(1 - 6/4) = exp(-0.5).
    score = M.corpus_bleu(["the cat sat on"], [["the cat sat on the mat"]])
    assert score == pytest.approx(math.exp(-0.5))


def test_bleu_mteval_corner_cases():
    # A 3-token output has no 4-grams: mteval counts that order as precision 1, so only BP is left:
    # exp(1 - 6/3) = e^-1. (sacrebleu's own formula would say 0.)
    assert M.corpus_bleu(["the cat sat"], [["the cat sat on the mat"]]) == pytest.approx(math.exp(-1))
    # No match at all: 1-grams 1/(2*4), 2-grams 1/(4*2); 3- and 4-grams are absent, so they count 1.
    # BLEU = (1/8 * 1/8) ** (1/4) * exp(1 - 5/4) = 0.353553 * 0.778801 = 0.275348
    score = M.corpus_bleu(["x y", "q r"], [["a b c"], ["d e"]])
    assert score == pytest.approx(0.275348, abs=1e-6)
    assert M.corpus_bleu([""], [["a b c d"]]) == 0.0


def test_bleu_is_case_insensitive_ascii_only():
    ref = [["blue spice is a coffee shop in the city centre ."]]
    assert M.corpus_bleu(["BLUE Spice IS a Coffee shop in the City Centre."], ref) == pytest.approx(1.0)
    # mteval folds ASCII letters only (tr/[A-Z]/[a-z]/), so É and é stay different tokens.
    assert M.mteval_tokenize("CAFÉ Rouge") == ["cafÉ", "rouge"]


def test_mteval_tokenization():
    # v13a splits most ASCII punctuation but not the apostrophe. It splits "." and "," unless a digit
    # is on both sides, and a dash only after a digit.
    assert M.mteval_tokenize("It costs £20-25, isn't it? 3.5 stars.") == [
        "it", "costs", "£20", "-", "25", ",", "isn't", "it", "?", "3.5", "stars", "."
    ]


def test_bleu_multi_reference_clipping_and_closest_length():
    # hyp: the cat sat on mat (5 tokens); refs of 4 and 6 tokens. Matches are counted against the
    # union of the references: 1-grams 5/5, 2-grams 3/4 (not "on mat"), 3-grams 2/3, 4-grams 1/2.
    # Both references are 1 token away from 5; mteval takes the shorter (4), so BP = 1.
    # BLEU = (1 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.25 ** 0.25 = 1/sqrt(2)
    score = M.corpus_bleu(["the cat sat on mat"], [["the cat sat on", "the cat sat on the mat"]])
    assert score == pytest.approx(1 / math.sqrt(2))
    # An output equal to any one reference scores 1, whatever the others say.
    assert M.corpus_bleu(["a b c d e"], [["x y z", "a b c d e", "q"]]) == pytest.approx(1.0)


def test_bleu_ignores_padding_references():
    # Blank references (what mteval's padding adds) are skipped when picking the closest length.
    assert M.corpus_bleu(["a b c d"], [["a b c d", ""]]) == pytest.approx(1.0)


# --- NIST ---------------------------------------------------------------------------------------


def test_nist_worked_example():
    # ref "a b c": counts a=b=c=1 (3 words), ab=bc=1. info(a) = info(b) = log2(3/1), info(ab) =
    # log2(count(a)/count(ab)) = 0. Unigram term (2 log2 3)/2, bigram term 0/1, higher orders 0.
    # Length ratio 2/3 = 1/1.5, so the penalty is exactly 0.5: NIST = 0.5 * log2(3) = 0.792481
    assert M.corpus_nist(["a b"], [["a b c"]]) == pytest.approx(0.5 * math.log2(3))


def test_nist_identical_single_segment():
    # Every unigram weighs log2(3); every longer n-gram has the same count as its prefix: weight 0.
    assert M.corpus_nist(["a b c"], [["a b c"]]) == pytest.approx(math.log2(3))


def test_nist_multi_reference_and_e2e_padding():
    # MR1 has 2 references, MR2 has 1, so mteval pads MR2 to 2 and divides all reference words
    # by 2 for the average reference length: 9 / 2 = 4.5.
    # Counts: a=b=c=2, d=e=f=1, 9 words; every bigram/trigram has its prefix's count, so weight 0.
    # Matches: a, b, c (weight log2(9/2) each) and d (log2 9) over 4 output unigrams.
    # NIST = (3 log2 4.5 + log2 9) / 4 * LP(4 / 4.5) = 2.419925 * 0.943184 = 2.282443
    expected = (3 * math.log2(4.5) + math.log2(9)) / 4 * nist_lp(4 / 4.5)
    score = M.corpus_nist(["a b c", "d"], [["a b c", "a b c"], ["d e f"]])
    assert score == pytest.approx(expected)
    assert score == pytest.approx(2.282443, abs=1e-6)


def test_nist_is_case_insensitive():
    refs = [["the cat is on the mat"], ["a dog sat there"]]
    assert M.corpus_nist(["The Cat sat on the MAT", "A dog"], refs) == pytest.approx(
        M.corpus_nist(["the cat sat on the mat", "a dog"], refs)
    )


# --- PTB tokenization (Python stand-in) ---------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Blue Spice is in the city centre.", "blue spice is in the city centre ."),
        ("It costs £20-25, isn't it?", "it costs # 20-25 , is n't it ?"),
        ("Prices are £20-£25; can't complain", "prices are # 20 - # 25 ; ca n't complain"),
        ("The pub 'The Mill' is \"family-friendly\".", "the pub ` the mill ' is `` family-friendly '' ."),
        ("near Café Rouge (riverside), 5 out of 5", "near café rouge -lrb- riverside -rrb- , 5 out of 5"),
        ("the city center., near it... Mr. Smith", "the city center. , near it ... mr. smith"),
        ("It's the kids' menu, cannot miss", "it 's the kids ' menu , can not miss"),
    ],
)
def test_ptb_tokenize_python(text, expected):
    assert M.ptb_tokenize_python(text) == expected


def test_coco_tokenize_drops_punctuation_without_java():
    # The COCO wrapper drops . , ' and friends but, being case-sensitive, keeps -lrb- / -rrb-.
    out = M.coco_tokenize(["It's £20 (cheap), isn't it?"], java=None)
    assert out == ["it 's # 20 -lrb- cheap -rrb- is n't it"]


# --- ROUGE-L and CIDEr --------------------------------------------------------------------------


def test_rouge_l_lcs():
    # LCS(a b c, a x b y c z) = 3: P = 3/3, R = 3/6. F = (1 + 1.2^2) P R / (R + 1.2^2 P)
    # = 2.44 * 0.5 / (0.5 + 1.44) = 0.628866
    assert M.corpus_rouge_l(["a b c"], [["a x b y c z"]]) == pytest.approx(1.22 / 1.94)
    # Equal P and R give F = P whatever beta is: LCS(a b c d, a c b d) = 3 -> 3/4.
    assert M.corpus_rouge_l(["a b c d"], [["a c b d"]]) == pytest.approx(0.75)


def test_rouge_l_multi_reference_takes_best_p_and_best_r_separately():
    # vs "a b c d e f": P = 2/2, R = 2/6; vs "a": P = 1/2, R = 1/1. COCO takes max P = 1 and
    # max R = 1 on their own, so F = 1 although neither reference matches exactly.
    assert M.corpus_rouge_l(["a b"], [["a b c d e f", "a"]]) == pytest.approx(1.0)
    # The corpus score is the mean over segments: (1 + 0) / 2.
    assert M.corpus_rouge_l(["a b", "x"], [["a b"], ["y"]]) == pytest.approx(0.5)


def test_cider_sanity():
    # Two segments with no n-gram in common: every n-gram has idf log(2/1), the tf-idf vectors of
    # output and reference are equal, cosine = 1 for n = 1..4, and CIDEr = 10 * mean = 10.
    segs = ["a b c d", "e f g h"]
    assert M.corpus_cider(segs, [[s] for s in segs]) == pytest.approx(10.0)
    # A single segment gives idf log(1/1) = 0 for everything: 0.
    assert M.corpus_cider(["a b c d"], [["a b c d"]]) == 0.0
    # Output sharing nothing with its reference scores 0 for that segment: mean (10 + 0) / 2.
    assert M.corpus_cider(["a b c d", "x y z w"], [["a b c d"], ["e f g h"]]) == pytest.approx(5.0)


# --- Reading files and errors -------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_references_groups_consecutive_mrs(tmp_path):
    csv_path = write(tmp_path / "refs.csv", 'mr,ref\n"A[x]","one."\n"A[x]","two."\n"B[y]",three\n"A[x]",four\n')
    mrs, refs = M.load_e2e_references(csv_path)
    # Like the official script, a repeated MR that is not adjacent starts a new group.
    assert mrs == ["A[x]", "B[y]", "A[x]"]
    assert refs == [["one.", "two."], ["three"], ["four"]]


def test_read_hypotheses(tmp_path):
    assert M.read_hypotheses(write(tmp_path / "h.txt", " a \nb\n")) == ["a", "b"]
    assert M.read_hypotheses(write(tmp_path / "h2.txt", "a\n\n")) == ["a", ""]


@pytest.mark.parametrize(
    "content, match",
    [("", "empty"), ("  \n", "empty"), ("mr,text\nx,y\n", "'mr' and 'ref' columns"), ("mr,ref\n", "no rows")],
)
def test_load_references_errors(tmp_path, content, match):
    with pytest.raises(UserError, match=match):
        M.load_e2e_references(write(tmp_path / "refs.csv", content))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        M.load_e2e_references(tmp_path / "nope.csv")
    with pytest.raises(UserError, match="not found"):
        M.read_hypotheses(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="empty"):
        M.read_hypotheses(write(tmp_path / "h.txt", ""))


def test_count_mismatch(tmp_path):
    with pytest.raises(UserError, match=r"3 hypotheses but 2 reference groups"):
        M.score_corpus(["a", "b", "c"], [["a"], ["b"]])
    refs = write(tmp_path / "refs.csv", "mr,ref\nA,one\nB,two\n")
    hyps = write(tmp_path / "h.txt", "one\n")
    with pytest.raises(UserError, match=r"1 lines .* 2 MRs"):
        M.score_files(refs, hyps)


def test_mr_without_reference():
    with pytest.raises(UserError, match="MR #2 has no non-empty reference"):
        M.score_corpus(["a", "b"], [["a"], [" "]])


# --- Without Java, or with a broken one -------------------------------------------------------


SMALL_HYPS = ["Blue Spice is a coffee shop in the city centre.", "The Mill is a cheap pub near Café Rouge."]
SMALL_REFS = [
    ["Blue Spice is a coffee shop in the city centre.", "There is a coffee shop called Blue Spice in the centre."],
    ["The Mill is a pub near Café Rouge with low prices.", "Near Café Rouge is The Mill, a cheap pub."],
]


def test_meteor_none_without_java(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.warns(RuntimeWarning, match="java not found"):
        result = M.score_corpus(SMALL_HYPS, SMALL_REFS)
    assert result["meteor"] is None
    assert result["n"] == 2
    assert result["bleu"] == pytest.approx(M.corpus_bleu(SMALL_HYPS, SMALL_REFS))
    for key in ("bleu", "nist", "rouge_l", "cider"):
        assert isinstance(result[key], float) and result[key] > 0


def test_meteor_none_when_java_is_broken(monkeypatch):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no 'false' binary")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: false)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = M.score_corpus(SMALL_HYPS, SMALL_REFS)
    messages = [str(w.message) for w in caught]
    assert any("METEOR failed" in m for m in messages), messages
    assert any("PTB tokenizer failed" in m for m in messages), messages
    assert result["meteor"] is None
    assert result["rouge_l"] > 0 and result["cider"] > 0


# --- Real data ----------------------------------------------------------------------------------

# Our scores for the shared system outputs. They match a Perl transcription of mteval-v13a-sig.pl
# (BLEU, NIST) and pycocoevalcap's own PTBTokenizer + Meteor/Rouge/Cider pipeline to all printed
# digits, so any change beyond rounding noise is a regression.
MEASURED = {
    "tgen-std": {"bleu": 0.661612, "nist": 8.544574, "meteor": 0.450377, "rouge_l": 0.691407, "cider": 2.231178},
    "tgen-minus": {"bleu": 0.637975, "nist": 8.573700, "meteor": 0.422577, "rouge_l": 0.689266, "cider": 2.008428},
    "sclstm": {"bleu": 0.417489, "nist": 6.171864, "meteor": 0.350564, "rouge_l": 0.523990, "cider": 1.006220},
}
# The published TGen baseline of the E2E challenge. tgen-std.txt is not that output file but run0
# of TGen trained on the same data in Dusek, Howcroft & Rieser (2019), so it lands close to these
# scores but not on them (gaps 0.002-0.007 on the 0..1 scores, 0.065 on NIST).
PUBLISHED_TGEN = {"bleu": 0.6593, "nist": 8.6094, "meteor": 0.4483, "rouge_l": 0.6850, "cider": 2.2338}


@pytest.fixture(scope="module")
def e2e_refs():
    if not E2E.is_dir():
        pytest.skip(f"E2E data not found at {E2E}")
    return M.load_e2e_references(E2E / "testset_w_refs.csv")


@needs_data
def test_load_real_references(e2e_refs):
    mrs, refs = e2e_refs
    assert len(mrs) == len(refs) == 630
    assert sum(len(g) for g in refs) == 4693
    assert mrs[0] == "name[Blue Spice], eatType[coffee shop], area[city centre]"


@pytest.mark.slow  # METEOR's JVM over three full systems
@needs_data
@needs_java
def test_real_system_outputs(e2e_refs):
    _, refs = e2e_refs
    systems = {name: M.read_hypotheses(E2E / "system-outputs" / f"{name}.txt") for name in MEASURED}
    start = time.perf_counter()
    results = M.score_systems(systems, refs)
    elapsed = time.perf_counter() - start
    for name, res in results.items():
        print(f"{name:10s} " + " ".join(f"{k}={res[k]:.4f}" for k in ("bleu", "nist", "meteor", "rouge_l", "cider")))
    print(f"scored {len(systems)} systems in {elapsed:.1f} s")
    for name, expected in MEASURED.items():
        assert results[name]["n"] == 630
        for key, value in expected.items():
            # Printed to 6 decimals; 1e-5 leaves room for float summation order only.
            assert results[name][key] == pytest.approx(value, abs=1e-5), (name, key)
    # Same-system sanity band around the published challenge baseline (a different output file,
    # see above): it catches scale slips (percent vs fraction, CIDEr-D x10, case-sensitive BLEU).
    tolerance = {"bleu": 0.01, "nist": 0.1, "meteor": 0.01, "rouge_l": 0.01, "cider": 0.1}
    for key, value in PUBLISHED_TGEN.items():
        assert results["tgen-std"][key] == pytest.approx(value, abs=tolerance[key]), key


@needs_data
def test_real_scores_without_java(monkeypatch):
    # score_files without Java: METEOR is None, and the Python PTB tokenizer gives the very same
    # ROUGE-L and CIDEr as the Java one.
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.warns(RuntimeWarning, match="java not found"):
        res = M.score_files(E2E / "testset_w_refs.csv", E2E / "system-outputs" / "tgen-std.txt")
    assert res["meteor"] is None and res["n"] == 630
    for key in ("bleu", "nist", "rouge_l", "cider"):
        assert res[key] == pytest.approx(MEASURED["tgen-std"][key], abs=1e-5), key


@pytest.mark.slow  # the Java PTB tokenizer (a JVM) over the test and dev references
@needs_data
@needs_java
def test_python_ptb_tokenizer_matches_java_on_e2e(e2e_refs):
    _, refs = e2e_refs
    _, dev_refs = M.load_e2e_references(E2E / "devset.csv")
    lines = [r for g in refs + dev_refs for r in g]
    for name in MEASURED:
        lines += M.read_hypotheses(E2E / "system-outputs" / f"{name}.txt")
    java = M.coco_tokenize(lines, java=shutil.which("java"))
    python = M.coco_tokenize(lines, java=None)
    mismatches = [(line, j, p) for line, j, p in zip(lines, java, python) if j != p]
    assert not mismatches, mismatches[:5]
