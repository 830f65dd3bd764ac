"""A user's rows, read through Hugging Face ``datasets`` (memory-mapped Arrow), and their shape.

``--data`` is a ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a folder of them, a folder written by
``Dataset.save_to_disk`` or a hub id (online only). The shape is detected from the column names as
TRL does; ``--columns`` maps the user's names onto ours first.

Loading writes Arrow files into a private temporary folder (removed when the process ends), never into
the user's ``datasets`` cache: a client's data stays where its owner put it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from ..config import parse_columns
from ..errors import UserError

log = logging.getLogger(__name__)

# shape -> the fields that make it, in detection order (TRL's, with E2E's mr/ref)
SHAPES = {"messages": ("messages",), "prompt-completion": ("prompt", "completion"), "e2e": ("mr", "ref"),
          "text": ("text",)}
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# E2E folders keep their test set out of training (``splitlora eval`` reads it)
HELD_OUT_PREFIX = "testset"

_workdir: Path | None = None


def _tmp() -> Path:
    global _workdir
    if _workdir is None:
        _workdir = Path(tempfile.mkdtemp(prefix="splitlora-data-"))
        atexit.register(shutil.rmtree, _workdir, True)
    return _workdir


@contextlib.contextmanager
def quiet_datasets():
    """No progress bars, no log lines (a parse error is ours to report, in one line) and no writes into
    the user's ``datasets`` cache (``map`` results go to temporary files that ``datasets`` removes at
    exit); every setting restored afterwards."""
    import datasets
    from datasets.utils import logging as ds_logging

    caching, bars = datasets.is_caching_enabled(), ds_logging.is_progress_bar_enabled()
    logger = logging.getLogger("datasets")
    level = logger.level
    datasets.disable_caching()
    ds_logging.disable_progress_bar()
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
        if caching:
            datasets.enable_caching()
        if bars:
            ds_logging.enable_progress_bar()


def data_files(path: Path) -> list[Path]:
    """The files a path stands for: itself, or a folder's readable files (``testset*`` left out)."""
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise UserError(f"data file {path}: unknown format {path.suffix or '(no extension)'!r} "
                            f"(expected {', '.join(BUILDERS)})")
        return [path]
    files = [f for f in sorted(path.iterdir()) if f.is_file() and f.suffix.lower() in BUILDERS
             and not f.name.startswith(HELD_OUT_PREFIX)]
    if not files:
        raise UserError(f"data folder {path} holds no {', '.join(BUILDERS)} files")
    kinds = {BUILDERS[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise UserError(f"data folder {path} mixes formats ({', '.join(sorted(kinds))}): keep one per folder")
    return files


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "state.json",
                                                                  "dataset_dict.json"))


def load_rows(spec: str, columns: str = ""):
    """``(dataset, source)``: the rows of ``spec`` with ``columns`` applied, and a name for messages."""
    path = Path(spec).expanduser()
    with quiet_datasets():
        if is_saved_dataset(path):
            ds = _load_saved(path)
        elif path.exists():
            ds = load_files(data_files(path), str(path))
        elif "/" in spec and not spec.startswith((".", "/", "~")) and not path.suffix:
            ds = _load_hub(spec)
        else:
            raise UserError(f"data not found: {spec}")
    return rename_columns(ds, parse_columns(columns), str(path)), str(path)


def load_files(files: list[Path], source: str):
    """One dataset of ``files`` (one format), in file order; a bad file gives its one-line error."""
    import datasets

    builder = BUILDERS[files[0].suffix.lower()]
    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"data file {f} is empty")
        if builder != "parquet":
            check_utf8(f)  # Arrow's JSON reader would only fail later, on reading the text
    options = {"keep_default_na": False, "encoding": "utf-8-sig"} if builder == "csv" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                     cache_dir=str(_tmp()), **options)
    except Exception as exc:  # datasets wraps the parser's error: find the line ourselves
        for f in files:
            diagnose(f)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "corresponds to no data" in first:  # datasets' words for a file with a header and no row
            raise UserError(f"{source} has no rows") from None
        raise UserError(f"cannot read {source}: {first}") from None


def check_utf8(path: Path, chunk: int = 1 << 24) -> None:
    """A one-line error at the first byte of ``path`` that is not UTF-8 (read in chunks: bounded memory)."""
    import codecs

    decoder, line, offset = codecs.getincrementaldecoder("utf-8")(), 1, 0
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                line += block[:exc.start].count(b"\n")
                raise UserError(f"{path}, line {line}: not UTF-8 text (byte {block[exc.start]:#04x})") from None
            line += block.count(b"\n")
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"{path}, line {line}: not UTF-8 text (cut off at the end)") from None


def diagnose(path: Path) -> None:
    """Raise a one-line error naming the first undecodable or malformed line of ``path``, if any."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text (byte {raw[exc.start]:#04x})") from None
    if BUILDERS[path.suffix.lower()] == "csv" and sum(1 for line in raw.splitlines() if line.strip()) < 2:
        raise UserError(f"data file {path} has no rows (only a header)")
    if BUILDERS[path.suffix.lower()] != "json":
        return
    text = raw.decode("utf-8")
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
            return
        except json.JSONDecodeError:
            pass  # perhaps JSON Lines under a .json name: check line by line
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}, line {number}: malformed JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(value, dict):
            raise UserError(f"{path}, line {number}: expected a JSON object per line")


def _load_saved(path: Path):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"saved dataset {path} has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    return ds


def _load_hub(name: str):
    import datasets

    try:
        return datasets.load_dataset(name, split="train", cache_dir=None)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"data {name!r} is not a local path and could not be read as a hub data set "
                        f"(offline?): {first}") from None


def rename_columns(ds, mapping: dict[str, str], source: str):
    missing = [c for c in mapping.values() if c not in ds.column_names]
    if missing:
        raise UserError(f"{source}: --columns names {missing[0]!r}, which is not a column "
                        f"(columns: {', '.join(ds.column_names)})")
    renames = {col: name for name, col in mapping.items() if col != name}
    clash = [n for n in renames.values() if n in ds.column_names and n not in renames]
    if clash:
        ds = ds.remove_columns(clash)  # the mapped column replaces a same-named one
    return ds.rename_columns(renames) if renames else ds


def detect_shape(columns, source: str) -> str:
    for shape, needs in SHAPES.items():
        if all(c in columns for c in needs):
            return shape
    raise UserError(f"{source}: cannot tell the row shape from columns {', '.join(columns) or '(none)'}: "
                    "expected 'messages', 'prompt' and 'completion', 'text', or 'mr' and 'ref' (map yours with --columns, "
                    "e.g. --columns prompt=question,completion=answer)")
