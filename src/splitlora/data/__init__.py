"""Data: loading any user's rows (or the synthetic set), encoding them, splitting across clients, batching."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import RunConfig
from ..errors import UserError
from .batching import Encoded, encode_all, encode_labelled
from .chat import chat_template_of
from .e2e import Example, load_e2e, synthetic_e2e
from .encode import KEY, ArrowRows, EncodedRows, encode_dataset
from ..config import parse_columns, parse_partition
from .partition import partition
from .rows import data_files, detect_shape, is_saved_dataset, load_files, load_rows, quiet_datasets

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: Sequence[Encoded]
    val: Sequence[Encoded]
    client_indices: list[list[int]]  # indices into ``train``, one list per client
    train_examples: Sequence[Example]  # E2E rows only (empty for other shapes)
    val_examples: Sequence[Example]
    shape: str = "e2e"
    train_rows: object = None  # the kept training rows (a ``datasets.Dataset``), in ``train``'s order
    client_names: list[str] = field(default_factory=list)

    def client_items(self, client: int) -> Sequence[Encoded]:
        indices = self.client_indices[client]
        if isinstance(self.train, EncodedRows):
            return self.train.subset(indices)
        return [self.train[i] for i in indices]


class _Examples(ArrowRows):
    """E2E rows of a dataset as :class:`Example`, read on demand."""

    columns = (KEY, "ref")

    def make(self, row: dict) -> Example:
        return Example(row[KEY], (row["ref"] or "").strip())


def load_examples(cfg: RunConfig) -> list[Example]:
    """The E2E rows of the synthetic set or an E2E CSV (kept for the benchmarks that read MRs)."""
    if cfg.data == "synthetic":
        return synthetic_e2e(cfg.synthetic_examples, seed=cfg.seed)
    return load_e2e(cfg.data)


def read_rows(cfg: RunConfig, spec: str, per_file: bool = False):
    """``(dataset, source, shape, file_sizes)`` of ``spec`` (``synthetic`` or anything :func:`load_rows` takes);
    ``per_file``: a folder read file by file, with each file's row count (``--partition files``)."""
    import datasets

    if spec == "synthetic":
        ex = synthetic_e2e(cfg.synthetic_examples, seed=cfg.seed)
        ds = datasets.Dataset.from_dict({"mr": [e.mr for e in ex], "ref": [e.ref for e in ex]})
        return ds, "synthetic", "e2e", None
    sizes = None
    if per_file:
        path = Path(spec).expanduser()
        if not path.is_dir() or is_saved_dataset(path):
            raise UserError(f"partition files needs --data to be a folder of per-site files (got {spec})")
        files = data_files(path)
        with quiet_datasets():
            parts = [load_files([f], str(f)) for f in files]
            ds = datasets.concatenate_datasets(parts)
        from .rows import rename_columns

        ds, source = rename_columns(ds, parse_columns(cfg.data_format.columns), str(path)), str(path)
        sizes = [(f.stem, len(p)) for f, p in zip(files, parts)]
    else:
        ds, source = load_rows(spec, cfg.data_format.columns)
    if len(ds) == 0:
        raise UserError(f"{source} has no rows")
    return ds, source, detect_shape(ds.column_names, source), sizes


def encode_rows(cfg: RunConfig, tokenizer, ds, source: str, shape: str):
    chat = None
    if shape == "messages" or (shape == "prompt-completion" and isinstance(ds[0]["prompt"], list)):
        chat = chat_template_of(tokenizer, cfg.data_format.chat_template, source)
    with quiet_datasets():
        return encode_dataset(ds, shape, tokenizer, prompt_template=cfg.prompt_template, chat=chat,
                              max_length=cfg.max_length, source=source)


def _column(ds, name: str) -> np.ndarray:
    return ds.data.column(name).to_numpy(zero_copy_only=False)


def _val_mask(enc, cfg: RunConfig, shape: str, usable: np.ndarray) -> np.ndarray:
    """Rows held out for validation: ``val_fraction`` of the distinct prompts (E2E: MRs; a prompt's
    rows go together, so none is in both), or of the rows for shapes without a prompt."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(cfg.seed)
    if shape in ("e2e", "prompt-completion") and enc.features[KEY].dtype == "string":
        keys = enc.data.column(KEY)
        distinct = pc.unique(keys.filter(pa.array(usable)))
        distinct = distinct.take(pc.sort_indices(distinct))  # code-point order, as Python's sorted()
        n_val = int(round(len(distinct) * cfg.val_fraction))
        chosen = distinct.take(pa.array(rng.permutation(len(distinct))[:n_val], type=pa.int64()))
        return pc.is_in(keys, value_set=chosen).to_numpy(zero_copy_only=False) & usable
    rows = np.flatnonzero(usable)
    n_val = int(round(len(rows) * cfg.val_fraction))
    mask = np.zeros(len(usable), dtype=bool)
    mask[rows[rng.permutation(len(rows))[:n_val]]] = True
    return mask


def prepare_data(cfg: RunConfig, tokenizer) -> PreparedData:
    """Load, encode, split off validation rows, drop rows without loss (counted), partition the rest."""
    kind, _ = parse_partition(cfg.partition)
    ds, source, shape, sizes = read_rows(cfg, cfg.data, per_file=kind == "files")
    enc = encode_rows(cfg, tokenizer, ds, source, shape)
    usable = ~_column(enc, "skip")
    loss = _column(enc, "loss")
    if cfg.data_format.val_data:
        vds, vsource, vshape, _ = read_rows(cfg, cfg.data_format.val_data)
        venc = encode_rows(cfg, tokenizer, vds, vsource, vshape)
        is_val = np.zeros(len(enc), dtype=bool)
        val = venc.select(np.flatnonzero(_column(venc, "loss")))
        if len(val) == 0:
            raise UserError(f"{vsource}: no validation row has loss tokens within max_length {cfg.max_length}")
    else:
        is_val = _val_mask(enc, cfg, shape, usable)
        val = enc.select(np.flatnonzero(is_val & loss))
    is_train = usable & ~is_val
    if not is_train.any():
        raise UserError(f"{source}: no training rows left after the validation split")
    kept = np.flatnonzero(is_train & loss)
    if not len(kept):
        raise UserError(f"max_length {cfg.max_length} leaves no completion tokens: every prompt fills it")
    if len(kept) < is_train.sum():
        log.warning("dropped %d of %d rows whose completion does not fit in max_length %d",
                    int(is_train.sum()) - len(kept), int(is_train.sum()), cfg.max_length)
    train = enc.select(kept)
    n_clients = cfg.clients  # an algorithm on pooled data (cen) reads ``train`` whole
    indices, names = _partition(cfg, train, shape, kept, sizes, n_clients, source)
    return PreparedData(
        train=EncodedRows(train), val=EncodedRows(val), client_indices=indices,
        train_examples=_Examples(train) if shape == "e2e" else [],
        val_examples=_Examples(val) if shape == "e2e" else [],
        shape=shape, train_rows=train, client_names=names)


def _partition(cfg: RunConfig, train, shape: str, kept: np.ndarray, sizes, n_clients: int, source: str):
    kind, _ = parse_partition(cfg.partition)
    if kind in ("column", "files"):
        if kind == "files":
            names = [name for name, _ in sizes]
            site = np.searchsorted(np.cumsum([n for _, n in sizes]), kept, side="right")
        else:
            names, site = _codes(train, cfg.partition.split(":", 1)[1], source)
        if len(names) != n_clients:
            raise UserError(f"partition {cfg.partition} gives {len(names)} clients ({', '.join(names[:8])}"
                            f"{', ...' if len(names) > 8 else ''}): pass --clients {len(names)}")
        groups = [np.flatnonzero(site == c).tolist() for c in range(len(names))]
        empty = [names[c] for c, g in enumerate(groups) if not g]
        if empty:
            raise UserError(f"partition {cfg.partition}: client {empty[0]} has no training rows left")
        log.info("clients: %s", ", ".join(f"{i}={n} ({len(g)} rows)" for i, (n, g) in enumerate(zip(names, groups))))
        return groups, names
    key = cfg.partition_key
    key_of = None
    if kind == "dirichlet":
        values = _key_values(train, key, shape, source)
        key_of = values.__getitem__
    return partition(len(train), n_clients, cfg.partition, cfg.seed, key_of=key_of), []


def _codes(train, column: str, source: str) -> tuple[list[str], np.ndarray]:
    """The distinct values of ``column`` (as text, sorted) and each row's index among them, in Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column not in train.column_names:
        raise UserError(f"{source}: partition column {column!r} is not a column (columns: {', '.join(train.column_names)})")
    values = train.with_format("arrow")[column]  # honours the selection of kept rows
    values = pc.cast(values, pa.string()).fill_null("")
    distinct = pc.unique(values)
    distinct = distinct.take(pc.sort_indices(distinct))
    return distinct.to_pylist(), pc.index_in(values, value_set=distinct).to_numpy(zero_copy_only=False)


def _key_values(train, key: str, shape: str, source: str) -> list[str]:
    """The partition key of every training row: an MR slot for E2E rows, else a column's value."""
    if shape == "e2e" and key not in train.column_names:
        return [Example(mr, "").slots().get(key, "") for mr in train[KEY]]
    if key not in train.column_names:
        raise UserError(f"{source}: the partition key {key!r} is not a column (columns: "
                        f"{', '.join(c for c in train.column_names if c not in ('input_ids', 'labels', 'loss', 'skip', KEY))}); "
                        "set it with --set partition_key=COLUMN")
    return ["" if v is None else str(v) for v in train[key]]


def encode_data_file(cfg: RunConfig, tokenizer, spec: str) -> EncodedRows:
    """Every row of ``spec`` that carries loss (a client's own file over gRPC: no validation split)."""
    ds, source, shape, _ = read_rows(cfg, spec)
    enc = encode_rows(cfg, tokenizer, ds, source, shape)
    kept = np.flatnonzero(_column(enc, "loss"))
    if not len(kept):
        raise UserError(f"{source}: no row has completion tokens within max_length {cfg.max_length}")
    if len(kept) < len(enc):
        log.warning("dropped %d of %d rows without loss tokens within max_length %d",
                    len(enc) - len(kept), len(enc), cfg.max_length)
    return EncodedRows(enc.select(kept))


__all__ = ["PreparedData", "prepare_data", "encode_data_file", "read_rows", "encode_rows", "load_examples",
           "Encoded", "Example", "encode_all", "encode_labelled", "EncodedRows"]
