"""E2E NLG Challenge scorer: BLEU, NIST, METEOR, ROUGE-L and CIDEr, as the official script computes them.

The official E2E evaluation (``measure_scores.py`` of tuetschek/e2e-metrics) runs two toolkits:

* **MT-Eval** (``mteval-v13a-sig.pl``) for BLEU-4 and NIST-5. It tokenizes with the v13a rules,
  lowercases ASCII letters (no ``-c`` flag), and scores one document holding every MR. References
  are grouped per MR; MRs with fewer references than the largest group are padded with empty
  references.
* **MS-COCO caption evaluation** for METEOR 1.5, ROUGE-L and CIDEr. Every reference and output is
  first run through the Stanford ``PTBTokenizer`` (``-preserveLines -lowerCase``), and punctuation
  tokens are dropped.

Where each definition comes from here:

* BLEU: ``sacrebleu`` counts the n-gram matches and lengths (13a tokenizer), and
  :func:`corpus_bleu` applies mteval's formula to them, which differs from sacrebleu's own only in
  corner cases. Text is lowercased here in ASCII only, like mteval's ``tr/[A-Z]/[a-z]/``. The
  padded empty references become ``None``, which sacrebleu drops, like the edited mteval script
  drops them when it picks the closest reference length.
* NIST: :func:`corpus_nist`, written here (no package implements mteval's NIST with its corpus-wide
  information weights). It uses sacrebleu's 13a tokenizer, the same regexes as mteval-v13a.
* METEOR: the ``meteor-1.5.jar`` that ships with ``pycocoevalcap``, run once for the whole corpus
  with the COCO wrapper's flags (``-stdio -l en -norm``). The corpus score comes from METEOR's own
  ``EVAL`` of the summed statistics. Needs Java.
* ROUGE-L and CIDEr: ``pycocoevalcap``'s ``Rouge`` (beta 1.2, mean over segments) and ``Cider``
  (the coco-caption code the E2E script ships: tf-idf n-grams 1..4, clipping, a Gaussian length
  penalty with sigma 6, times 10, document frequencies from this corpus's references). Neither
  needs Java.
* PTB tokenization: the ``stanford-corenlp-3.4.1.jar`` that ships with ``pycocoevalcap`` when
  ``java`` is on PATH. Without Java, :func:`ptb_tokenize_python` stands in. It follows the jar's
  rules that matter for English restaurant descriptions, and it gives the jar's output on every
  reference and system output in the E2E dev and test data. On other text it is an approximation.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

from splitlora.errors import UserError, require

__all__ = [
    "load_e2e_references",
    "read_hypotheses",
    "score_corpus",
    "score_files",
    "score_systems",
    "mteval_tokenize",
    "corpus_bleu",
    "corpus_nist",
    "coco_tokenize",
    "ptb_tokenize_python",
    "corpus_meteor",
    "corpus_rouge_l",
    "corpus_cider",
    "MeteorError",
]

# Seconds before an external Java call (PTB tokenizer or METEOR) is given up.
_JAVA_TIMEOUT_S = 900


# ---------------------------------------------------------------------------------------------
# Reading the data
# ---------------------------------------------------------------------------------------------

# The official reader repairs a few encoding accidents in the reference CSVs (read_tsv).
_REF_FIXES = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


def load_e2e_references(path: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """Read an E2E CSV (columns ``mr`` and ``ref``) and group the references per MR.

    Like the official script, consecutive rows with the same MR form one group, so an MR that comes
    back later in the file starts a new group. The official test set gives 630 groups.

    Returns ``(mrs, refs)``, where ``refs[i]`` lists the references of ``mrs[i]``.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"reference file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read reference file {p}: {e}") from None
    if not text.strip():
        raise UserError(f"reference file is empty: {p}")
    try:
        return _group_references(p, csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise UserError(f"reference file {p} is not valid CSV: {e}") from None


def _group_references(p: Path, reader: csv.DictReader) -> tuple[list[str], list[list[str]]]:
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "mr" not in fields or "ref" not in fields:
        raise UserError(
            f"reference file {p} needs 'mr' and 'ref' columns, found: {', '.join(fields) or 'none'}"
        )
    reader.fieldnames = fields
    mrs: list[str] = []
    refs: list[list[str]] = []
    for row in reader:
        mr, ref = row.get("mr"), row.get("ref")
        if mr is None or ref is None:
            raise UserError(f"reference file {p}, line {reader.line_num}: missing 'mr' or 'ref' value")
        for bad, good in _REF_FIXES:
            mr, ref = mr.replace(bad, good), ref.replace(bad, good)
        mr, ref = mr.strip(), ref.strip()
        if mrs and mr == mrs[-1]:
            refs[-1].append(ref)
        else:
            mrs.append(mr)
            refs.append([ref])
    if not mrs:
        raise UserError(f"reference file {p} has a header but no rows")
    return mrs, refs


def read_hypotheses(path: str | os.PathLike) -> list[str]:
    """Read system outputs: one line per MR, in the order of the MRs in the reference file.

    Lines are stripped, as the official reader does. A final newline does not add an empty output.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"hypothesis file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read hypothesis file {p}: {e}") from None
    if not text.strip():
        raise UserError(f"hypothesis file is empty: {p}")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


# ---------------------------------------------------------------------------------------------
# MT-Eval side: BLEU and NIST
# ---------------------------------------------------------------------------------------------

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@lru_cache(maxsize=1)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def _mteval_lower(text: str) -> str:
    """mteval-v13a's default case folding: ``tr/[A-Z]/[a-z]/``, ASCII letters only."""
    return text.translate(_ASCII_LOWER)


def mteval_tokenize(text: str) -> list[str]:
    """Tokens as mteval-v13a sees them: ASCII lowercasing, then the v13a tokenizer."""
    return _tokenizer_13a()(_mteval_lower(text)).split()


def _check_pairs(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if len(hyps) != len(refs):
        raise UserError(
            f"{len(hyps)} hypotheses but {len(refs)} reference groups (MRs): they must match one to one"
        )
    if not hyps:
        raise UserError("nothing to score: 0 hypotheses")
    for i, group in enumerate(refs):
        if not any(r.strip() for r in group):
            raise UserError(f"MR #{i + 1} has no non-empty reference")


def corpus_bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (0..1) as mteval-v13a computes it, case-insensitive, multi-reference.

    sacrebleu does the counting: 13a tokens, matches clipped by the largest count in any one
    reference, and the closest reference length with ties going to the shorter one. The score then
    follows mteval's ``bleu_score``, which also covers the corner cases where sacrebleu's own
    formula says 0:

    * an order with no hypothesis n-grams at all (every output shorter than n tokens) counts as
      precision 1;
    * an order with n-grams but no match counts as 1 / (2^k * n-grams), for the k-th such order;
    * the brevity penalty is exp(min(0, 1 - ref_len / hyp_len)), and 0 for empty output.
    """
    from sacrebleu.metrics import BLEU

    _check_pairs(hyps, refs)
    n_streams = max(len(group) for group in refs)
    streams: list[list[str | None]] = [[] for _ in range(n_streams)]
    for group in refs:
        present = [_mteval_lower(r) for r in group if r.strip()]
        for k in range(n_streams):
            streams[k].append(present[k] if k < len(present) else None)
    stats = BLEU(tokenize="13a", lowercase=False, force=True).corpus_score(
        [_mteval_lower(h) for h in hyps], streams
    )
    return _mteval_bleu(list(stats.counts), list(stats.totals), stats.sys_len, stats.ref_len)


def _mteval_bleu(matches: list[int], totals: list[int], hyp_len: int, ref_len: int) -> float:
    """mteval-v13a ``bleu_score`` (smoothed version, the default) from corpus statistics."""
    if hyp_len <= 0:
        return 0.0
    log_sum, smooth = 0.0, 1
    for match, total in zip(matches, totals):
        if total == 0:
            continue  # log(1)
        if match == 0:
            smooth *= 2
            log_sum += math.log(1 / (smooth * total))
        else:
            log_sum += math.log(match / total)
    return math.exp(log_sum / len(matches)) * math.exp(min(0.0, 1 - ref_len / hyp_len))


# NIST length-penalty constant from mteval: a system/reference length ratio of 1.5 scores 0.5.
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def _ngram_counts(tokens: Sequence[str], max_n: int) -> Counter:
    return Counter(
        tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1)
    )


def corpus_nist(hyps: Sequence[str], refs: Sequence[Sequence[str]], max_n: int = 5) -> float:
    """Corpus NIST-5 as ``mteval-v13a-sig.pl`` computes it for the E2E script (written here).

    With ``count`` taken over every reference in the corpus, the information weight of an n-gram
    w1..wn is ``log2(count(w1..wn-1) / count(w1..wn))``. For a unigram the numerator is the total
    number of reference words. Then::

        NIST = sum over n = 1..5 of  (sum of info(g) * clipped matches of g) / (hypothesis n-grams)
               * exp(-beta * log(ratio) ** 2)   when ratio < 1, else the factor is 1

    A match is clipped to the largest count of the n-gram in any single reference of its MR. The
    ratio is hypothesis words / average reference length. As in the E2E script, the average is
    (all reference words) / (largest number of references of any MR), because every MR is padded
    with empty references up to that number. Beta is log(2) / log(1.5)**2.

    This copies one Perl quirk: mteval tests the (n-1)-gram prefix string for truth, so a bigram
    whose first token is ``0`` is weighted like a unigram.

    Worked example, with one MR, hypothesis ``a b`` and reference ``a b c``: the counts are a=1,
    b=1, c=1 (3 words), ab=1, bc=1. Then info(a) = log2(3/1) = info(b), and info(ab) = log2(1/1)
    = 0. The unigram term is (log2 3 + log2 3) / 2 and the bigram term is 0 / 1. With ratio 2/3,
    the penalty is exp(-beta * log(2/3)**2) = 0.5, so NIST = 0.5 * log2(3) = 0.7925.
    """
    _check_pairs(hyps, refs)
    hyp_toks = [mteval_tokenize(h) for h in hyps]
    ref_toks = [[mteval_tokenize(r) for r in group] for group in refs]

    # Corpus-wide reference n-gram counts (mteval's compute_ngram_info).
    counts: Counter = Counter()
    total_ref_words = 0
    for group in ref_toks:
        for ref in group:
            total_ref_words += len(ref)
            counts.update(_ngram_counts(ref, max_n))

    def info(ngram: tuple[str, ...]) -> float:
        prefix = ngram[:-1]
        # Perl: `$mgram ? count/count{$mgram} : count/$tot_wrds`; the string "0" is false in Perl.
        denominator = total_ref_words if (not prefix or prefix == ("0",)) else counts[prefix]
        return -math.log(counts[ngram] / denominator) / math.log(2)

    info_sum = [0.0] * max_n
    hyp_ngrams = [0] * max_n
    for hyp, group in zip(hyp_toks, ref_toks):
        ref_max: dict[tuple[str, ...], int] = {}
        for ref in group:
            for g, c in _ngram_counts(ref, max_n).items():
                if c > ref_max.get(g, 0):
                    ref_max[g] = c
        for g, c in _ngram_counts(hyp, max_n).items():
            if g in ref_max:
                info_sum[len(g) - 1] += info(g) * min(c, ref_max[g])
        for n in range(1, max_n + 1):
            hyp_ngrams[n - 1] += max(len(hyp) - n + 1, 0)

    if total_ref_words == 0:
        return 0.0
    n_ref_sets = max(len(group) for group in refs)
    ratio = hyp_ngrams[0] / (total_ref_words / n_ref_sets)
    if ratio >= 1:
        penalty = 1.0
    elif ratio <= 0:
        penalty = 0.0
    else:
        penalty = math.exp(-_NIST_BETA * math.log(ratio) ** 2)
    return penalty * sum(info_sum[n] / max(hyp_ngrams[n], 1) for n in range(max_n))


# ---------------------------------------------------------------------------------------------
# MS-COCO side: PTB tokenization, METEOR, ROUGE-L, CIDEr
# ---------------------------------------------------------------------------------------------


def _coco_dir(sub: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pycocoevalcap is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def _coco_punctuation() -> frozenset[str]:
    require("pycocoevalcap", "e2e", "the E2E metrics (PTB tokenization, ROUGE-L, CIDEr)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    return frozenset(PUNCTUATIONS)


def _one_line(text: str) -> str:
    # Any line break would make the line-preserving tokenizer emit an extra line.
    return " ".join(text.splitlines())


def _drop_punctuation(tokenized: str, punctuation: frozenset[str]) -> str:
    # Same as the COCO wrapper: split on single spaces and drop the listed punctuation tokens.
    # The list is upper case (-LRB-) while -lowerCase output is lower case (-lrb-), so brackets stay.
    return " ".join(w for w in tokenized.rstrip().split(" ") if w not in punctuation)


def _ptb_tokenize_java(java: str, lines: list[str]) -> list[str]:
    jar = _coco_dir("tokenizer") / "stanford-corenlp-3.4.1.jar"
    if not jar.is_file():
        raise RuntimeError(f"PTB tokenizer jar not found: {jar}")
    cmd = [java, "-Dfile.encoding=UTF-8", "-cp", str(jar),
           "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    proc = subprocess.run(cmd, input=("\n".join(lines) + "\n").encode("utf-8"),
                          capture_output=True, timeout=_JAVA_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(f"PTB tokenizer exited with {proc.returncode}: {err[-1] if err else ''}")
    out = proc.stdout.decode("utf-8").split("\n")
    if len(out) < len(lines) or any(x.strip() for x in out[len(lines):]):
        raise RuntimeError(f"PTB tokenizer returned {len(out)} lines for {len(lines)}")
    return out[: len(lines)]


def coco_tokenize(texts: Sequence[str], *, java: str | None = None) -> list[str]:
    """Tokenize as the COCO evaluation does: PTB tokens, lowercased, punctuation tokens dropped.

    If ``java`` (a path to the java binary) is given, the Stanford jar does the work. If it is
    ``None`` or the jar fails (with a warning), :func:`ptb_tokenize_python` does.
    """
    lines = [_one_line(t) for t in texts]
    tokenized: list[str] | None = None
    if java is not None and lines:
        try:
            tokenized = _ptb_tokenize_java(java, lines)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            warnings.warn(f"Java PTB tokenizer failed ({e}); using the Python PTB tokenizer",
                          RuntimeWarning, stacklevel=2)
    if tokenized is None:
        tokenized = [ptb_tokenize_python(line) for line in lines]
    punctuation = _coco_punctuation()
    return [_drop_punctuation(t, punctuation) for t in tokenized]


# --- Python stand-in for Stanford PTBTokenizer 3.4.1 (-preserveLines -lowerCase) ---------------

# Abbreviations that keep their period, as in PTBLexer. The company ones (inc, corp, co, ltd) also
# give an extra "." when a capital letter follows.
_PTB_TITLES = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "ave",
                         "mt", "ft", "gen", "gov", "rev", "sen", "rep", "capt", "col", "lt", "sgt"})
_PTB_COMPANY = frozenset({"inc", "corp", "co", "ltd"})
_PTB_SPECIAL_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"),
                      "wanna": ("wan", "na"), "gotta": ("got", "ta")}
_PTB_CHAR_MAP = {"£": "#", "€": "$", "¢": "cents", "(": "-LRB-", ")": "-RRB-", "[": "-LSB-",
                 "]": "-RSB-", "{": "-LCB-", "}": "-RCB-", "–": "--", "—": "--"}
_PTB_FRACTIONS = {"¼": "1/4", "½": "1/2", "¾": "3/4", "⅓": "1/3", "⅔": "2/3"}
_L = r"[^\W\d_]"  # a letter
_A = r"[^\W_]"  # a letter or digit
_PTB_TOKEN = re.compile(
    rf"""
      (?P<ws>\s+)
    | (?P<ellipsis>\.{{3,}})
    | (?P<quote2>``|'')
    | (?P<apos_word>'(?:n'|em\b|\d0s\b|t(?=is\b)))
    | (?P<acronym>(?:{_L}\.){{2,}}|{_L}\.(?=\s|$))
    | (?P<word>
          (?:(?<!{_A})[-+](?=\d)|(?<!{_A})\.(?=\d))?     # sign or leading point of a number
          {_A}+
          (?:[-'/.]{_A}+|(?<=\d)[,:]\d+|(?<=[A-Z])&[A-Z]+)*  # hyphens, clitics, 3,000 12:30 AT&T
      )
    | (?P<dashes>--+|[–—])
    | (?P<qe>[?!]+)
    | (?P<stars>\*+)
    | (?P<other>.)
    """,
    re.X,
)
_PTB_CLITIC = re.compile(r"(?i)^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$")


def ptb_tokenize_python(line: str) -> str:
    """Tokenize one line like Stanford PTBTokenizer 3.4.1 with ``-preserveLines -lowerCase``.

    This is the stand-in used when Java is missing, so it should give the jar's output. It matches
    the jar on all 11,255 references and system outputs of the E2E dev and test data (the tests
    check this when Java is present). It covers: punctuation split from words, a period kept on
    single letters, acronyms and common abbreviations, and on a word right before ``,;:``.
    Numbers stay whole (``3.5``, ``3,000``, ``20-25``). Clitics split (``is n't``, ``it 's``,
    ``ca n't``, ``can not``). Quotes become `````` `` `` and ``''``, and an opening single quote
    becomes a backquote. £ becomes ``#``, € becomes ``$`` and brackets become ``-LRB-`` and so on.
    On other text it may differ from the jar.
    """
    for frac, repl in _PTB_FRACTIONS.items():
        line = line.replace(frac, f" {repl} ")
    out: list[str] = []
    pos, end = 0, len(line)
    while pos < end:
        m = _PTB_TOKEN.match(line, pos)
        assert m is not None  # the last alternative matches any character
        kind, tok = m.lastgroup, m.group()
        pos = m.end()
        nxt = line[pos : pos + 1]
        if kind == "ws":
            continue
        if kind == "ellipsis":
            out.append("...")
        elif kind in ("quote2", "apos_word", "qe", "stars"):
            out.append(tok)
        elif kind == "acronym":
            out.append(tok)
            if len(tok) > 2 and tok.lower() != "u.s." and re.match(r"\s+[A-Z]", line[pos:]):
                out.append(".")  # PTBLexer repeats the period of a sentence-final acronym
        elif kind == "word":
            low = tok.lower()
            if nxt == "." and (low in _PTB_TITLES or low in _PTB_COMPANY):
                pos += 1
                out.append(tok + ".")
                if low in _PTB_COMPANY and re.match(r"\s+[A-Z]", line[pos:]):
                    out.append(".")
            elif nxt == "." and line[pos + 1 : pos + 2] in (",", ";", ":"):
                pos += 1
                out.append(tok + ".")
            elif low in _PTB_SPECIAL_WORDS:
                out.extend(_PTB_SPECIAL_WORDS[low])
            else:
                clitic = _PTB_CLITIC.match(tok)
                out.extend(clitic.groups() if clitic else (tok,))
        elif kind == "dashes":
            out.append("--")
        elif tok == '"':
            out.append("``" if nxt.isalnum() else "''")
        elif tok == "'":
            prev = line[m.start() - 1 : m.start()]
            out.append("`" if nxt.isalpha() and not prev.isalnum() else "'")
        else:
            out.append(_PTB_CHAR_MAP.get(tok, tok))
    return " ".join(out).lower()


# --- METEOR --------------------------------------------------------------------------------------


class MeteorError(RuntimeError):
    """The METEOR jar could not be run or gave output that could not be read."""


def corpus_meteor(hyps: Sequence[str], refs: Sequence[Sequence[str]], *, java: str = "java") -> float:
    """Corpus METEOR 1.5 through ``meteor-1.5.jar`` (from pycocoevalcap), one JVM for the corpus.

    The inputs should be COCO-tokenized (:func:`coco_tokenize`), as in the official script. This
    follows pycocoevalcap's wrapper: a ``SCORE ||| ref1 ||| ... ||| hyp`` line per segment, then one
    ``EVAL`` line with every segment's statistics. METEOR's answer to that line is the corpus score.
    It is not a mean of segment scores.
    """
    return _meteor_corpora(java, [(hyps, refs)])[0]


def _meteor_corpora(java: str, corpora: Sequence[tuple[Sequence[str], Sequence[Sequence[str]]]]) -> list[float]:
    """METEOR corpus scores for several (hyps, refs) corpora, from one METEOR process.

    Starting the JVM and loading the paraphrase table takes most of the time.
    """
    for hyps, refs in corpora:
        if len(hyps) != len(refs) or not hyps:
            raise UserError(f"{len(hyps)} hypotheses but {len(refs)} reference groups")
    jar = _coco_dir("meteor") / "meteor-1.5.jar"
    if not jar.is_file():
        raise MeteorError(f"METEOR jar not found: {jar}")
    score_lines = []
    for hyps, refs in corpora:
        for hyp, group in zip(hyps, refs):
            hyp = _one_line(hyp).replace("|||", "").replace("  ", " ")
            score_lines.append(" ||| ".join(("SCORE", " ||| ".join(_one_line(r) for r in group), hyp)))
    # The COCO wrapper's command. The JVM is also told to use UTF-8 so that non-ASCII words
    # (Café, £) are read the same way under any locale.
    cmd = [java, "-Xmx2G", "-Dfile.encoding=UTF-8", "-jar", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(cmd, cwd=str(jar.parent), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err)
        except OSError as e:
            raise MeteorError(f"cannot start java: {e}") from None
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout
        timer = threading.Timer(_JAVA_TIMEOUT_S, proc.kill)
        timer.start()
        writer_error: list[BaseException] = []

        def write_scores() -> None:
            try:
                stdin.write(("\n".join(score_lines) + "\n").encode("utf-8"))
                stdin.flush()
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                writer_error.append(e)

        def read_lines(n: int) -> list[str]:
            lines = [stdout.readline().decode("utf-8").strip() for _ in range(n)]
            if not all(lines):
                raise MeteorError("METEOR stopped before answering")
            return lines

        try:
            # Write from a thread while reading here, so that neither pipe fills up and blocks.
            writer = threading.Thread(target=write_scores, daemon=True)
            writer.start()
            stats = read_lines(len(score_lines))
            writer.join()
            if writer_error:
                raise MeteorError(f"cannot write to METEOR: {writer_error[0]}")
            scores, offset = [], 0
            for hyps, _ in corpora:
                corpus_stats = stats[offset : offset + len(hyps)]
                offset += len(hyps)
                stdin.write(("EVAL ||| " + " ||| ".join(corpus_stats) + "\n").encode("utf-8"))
                stdin.flush()
                # The answer: one score per segment, then the corpus score. Read just those lines:
                # waiting for the JVM to exit after closing stdin would cost seconds.
                scores.append(float(read_lines(len(hyps) + 1)[-1]))
            return scores
        except (OSError, ValueError, MeteorError) as e:
            err.seek(0)
            tail = err.read().decode("utf-8", "replace").strip().splitlines()
            raise MeteorError(f"{e}{' (' + tail[-1] + ')' if tail else ''}") from None
        finally:
            timer.cancel()
            proc.kill()
            proc.wait()
            for pipe in (stdin, stdout):
                try:
                    pipe.close()
                except OSError:
                    pass


# --- ROUGE-L and CIDEr (pycocoevalcap) -------------------------------------------------------------


def _coco_dicts(hyps: Sequence[str], refs: Sequence[Sequence[str]]):
    if len(hyps) != len(refs) or not hyps:
        raise UserError(f"{len(hyps)} hypotheses but {len(refs)} reference groups")
    gts = {i: list(group) for i, group in enumerate(refs)}
    res = {i: [hyp] for i, hyp in enumerate(hyps)}
    return gts, res


def corpus_rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F (beta 1.2) over segments, from pycocoevalcap's ``Rouge``.

    The inputs should be tokenized (space-separated). For each segment the best precision and the
    best recall over its references are combined: F = (1 + b^2) P R / (R + b^2 P).
    """
    require("pycocoevalcap", "e2e", "the E2E metrics (ROUGE-L, CIDEr)")
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco_dicts(hyps, refs)
    return float(Rouge().compute_score(gts, res)[0])


def corpus_cider(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr from pycocoevalcap's ``Cider``, the coco-caption code the E2E script uses.

    The inputs should be tokenized. Document frequencies come from the references of this corpus,
    so one segment alone always scores 0 (every n-gram has idf log(1/1) = 0).
    """
    require("pycocoevalcap", "e2e", "the E2E metrics (ROUGE-L, CIDEr)")
    from pycocoevalcap.cider.cider import Cider

    gts, res = _coco_dicts(hyps, refs)
    if not any(r.split() for group in refs for r in group):
        return 0.0  # no reference n-gram at all (pycocoevalcap would fail on max() of nothing)
    return float(Cider().compute_score(gts, res)[0])


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------


def score_corpus(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict:
    """Score system outputs against grouped references, as the official E2E script does.

    Returns ``{"bleu", "nist", "meteor", "rouge_l", "cider", "n"}`` on the official scales: BLEU,
    METEOR and ROUGE-L lie in 0..1, NIST is around 8 and CIDEr around 2 for good E2E systems. ``n``
    is the number of segments. If ``java`` is not on PATH, or METEOR fails, METEOR is ``None`` and
    a warning says why. The other four are still computed, with the Python PTB tokenizer standing
    in for the Java one when Java is missing.
    """
    return score_systems({"": hyps}, refs)[""]


def score_systems(systems: Mapping[str, Sequence[str]], refs: Sequence[Sequence[str]]) -> dict[str, dict]:
    """Score several systems on the same references: ``{name: score_corpus(hyps, refs)}``.

    Faster than one :func:`score_corpus` per system: the references are tokenized once and one
    METEOR process serves every system.
    """
    refs = [[str(r) for r in group] for group in refs]
    hyps_of = {name: [str(h) for h in hyps] for name, hyps in systems.items()}
    for name, hyps in hyps_of.items():
        try:
            _check_pairs(hyps, refs)
        except UserError as e:
            raise UserError(f"system {name}: {e}" if name else str(e)) from None

    java = shutil.which("java")
    if java is None:
        warnings.warn("java not found on PATH: METEOR is None, ROUGE-L/CIDEr use the Python PTB "
                      "tokenizer", RuntimeWarning, stacklevel=3)
    # Like the COCO evaluator: one tokenizer run for all references, one for all outputs.
    tok_refs_flat = iter(coco_tokenize([r for group in refs for r in group], java=java))
    tok_refs = [[next(tok_refs_flat) for _ in group] for group in refs]
    tok_hyps_of = {name: coco_tokenize(hyps, java=java) for name, hyps in hyps_of.items()}

    meteors: list[float | None] = [None] * len(hyps_of)
    if java is not None:
        try:
            meteors = list(_meteor_corpora(java, [(t, tok_refs) for t in tok_hyps_of.values()]))
        except MeteorError as e:
            warnings.warn(f"METEOR failed, reported as None: {e}", RuntimeWarning, stacklevel=3)

    results: dict[str, dict] = {}
    for (name, hyps), meteor in zip(hyps_of.items(), meteors):
        tok_hyps = tok_hyps_of[name]
        results[name] = {
            "bleu": corpus_bleu(hyps, refs),
            "nist": corpus_nist(hyps, refs),
            "meteor": meteor,
            "rouge_l": corpus_rouge_l(tok_hyps, tok_refs),
            "cider": corpus_cider(tok_hyps, tok_refs),
            "n": len(hyps),
        }
    return results


def score_files(refs_csv: str | os.PathLike, hyp_path: str | os.PathLike) -> dict:
    """Score a hypothesis file (one line per MR) against an E2E reference CSV."""
    _, refs = load_e2e_references(refs_csv)
    hyps = read_hypotheses(hyp_path)
    if len(hyps) != len(refs):
        raise UserError(
            f"{hyp_path} has {len(hyps)} lines but {refs_csv} has {len(refs)} MRs: "
            "they must match one to one"
        )
    return score_corpus(hyps, refs)
