"""`validate(path, contract)`: stream a sharded table through its GX suite and report.

How large tables are handled: rows are read shard by shard in record batches, summarised into
flat columns (derive.py) and handed to GX in chunks of at most `chunk_rows` rows. Rows go to a
chunk by a hash of their partition key (user_id for events and examples, item_id for items), so
every row of one user lands in one chunk and the uniqueness rules hold over the whole table,
not just within a chunk. `sample_rows` validates only the users (items) whose hash falls in
the first share of buckets: all rows of the sampled users, about `sample_rows` rows; the report
says so. Memory is bounded by one chunk of flat columns plus the item id set.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..actions import ActionVocab, vocab_for
from ..format import SPLITS, FormatError, shard_paths
from . import derive
from .report import ValidationReport
from .suites import CONTRACTS, NEEDS, suite_dict

BUCKETS = 1024
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads consecutive ids over buckets
DEFAULT_CHUNK_ROWS = 1_000_000
DEFAULT_MAX_FUTURE_S = 86_400


def _parameters(contract: str, actions, meta: dict | None, now: float | None, max_future_s: int) -> dict:
    """The suite's evaluation parameters: the ts bound, the action ids, the examples' L."""
    params: dict = {"max_ts": int((time.time() if now is None else now) + max_future_s)}
    action_ids = _action_ids(actions, meta)
    if action_ids is not None:
        params["action_ids"] = action_ids
        params["max_action_id"] = max(action_ids)
    if contract == "examples" and meta and meta.get("max_history") is not None:
        params["max_history"] = int(meta["max_history"])
    return params


def _items_for(contract: str, path: Path, items, meta_dir, notes: list[str]):
    """(item ids, items path) for referential integrity; (None, None) with a note when none is found."""
    if contract == "items":
        return None, None
    items_path = Path(items) if items is not None else _sibling_items(path, meta_dir)
    if items is not None and not items_path.exists():
        raise FileNotFoundError(f"items table {items_path} does not exist")
    if items_path is None:
        notes.append("referential integrity NOT checked: no items table found beside the data (pass items=/--items)")
        return None, None
    return _read_item_ids(items_path, notes), items_path


def validate(
    path: str | Path,
    contract: str,
    *,
    items: str | Path | None = None,
    actions: ActionVocab | Sequence[str] | str | None = None,
    out_dir: str | Path | None = None,
    sample_rows: int | None = None,
    suite: str | Path | dict | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    max_future_s: int = DEFAULT_MAX_FUTURE_S,
    now: float | None = None,
    progress: bool = False,
) -> ValidationReport:
    """Validate the table at `path` (a folder of part-*.parquet shards, a single file, a RAW/EX
    folder holding `<contract>/`, or for examples an EX folder: all its splits together).

    items: the items table for referential integrity; default the `items/` folder beside the data.
    actions: vocabulary (ActionVocab, names by id, or a source name); default the nearest meta.json.
    suite: a suite JSON file or dict to use instead of the built-in contract (same derived columns).
    """
    t0 = time.perf_counter()
    path = _checked_args(path, contract, sample_rows, chunk_rows)
    shards = _find_shards(path, contract)
    notes: list[str] = []
    meta, meta_dir = _nearest_meta(path)

    params = _parameters(contract, actions, meta, now, max_future_s)
    item_ids, items_path = _items_for(contract, path, items, meta_dir, notes)
    available = {"items": item_ids is not None, "actions": "action_ids" in params,
                 "max_history": "max_history" in params}

    suite_json = _load_suite(suite, contract)
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    hi, n_chunks = _plan(total, chunk_rows, sample_rows)
    if hi < BUCKETS:
        notes.append(f"sampled: validated all rows of the {'items' if contract == 'items' else 'users'} "
                     f"hashed into {hi} of {BUCKETS} buckets (about {sample_rows:,} of {total:,} rows)")

    from .gx_runner import GXRunner  # imports great_expectations (slow), only when validating

    runner = GXRunner(contract, suite_json, params, available, NEEDS)
    derive_notes: set[str] = set()
    validated = _run_chunks(runner, shards, contract, hi, n_chunks, item_ids, derive_notes, progress)
    notes += sorted(derive_notes)
    results, gx_results, success = runner.finish()

    report = ValidationReport(
        contract=contract, path=str(path), suite=suite_json.get("name", contract), success=success,
        results=results, rows_total=total, rows_validated=validated, chunks=max(runner.chunks, 1), notes=notes,
        parameters=_param_summary(params), items_path=str(items_path) if items_path else None,
        seconds=time.perf_counter() - t0, gx_version=runner.gx_version, gx_results=gx_results,
    )
    if out_dir is not None:
        report.write(out_dir)
    return report


def _checked_args(path, contract: str, sample_rows: int | None, chunk_rows: int) -> Path:
    if contract not in CONTRACTS:
        raise ValueError(f"unknown contract '{contract}'; choose one of {', '.join(CONTRACTS)}")
    if sample_rows is not None and sample_rows <= 0:
        raise ValueError(f"sample_rows must be positive, got {sample_rows}")
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def _run_chunks(runner, shards, contract: str, hi: int, n_chunks: int, item_ids, derive_notes: set[str],
                progress: bool) -> int:
    """Run the suite over the rows hashed into buckets [0, hi), in n_chunks chunks -> rows validated."""
    key = derive.PARTITION_KEY[contract]
    validated = 0
    bounds = [(k * hi // n_chunks, (k + 1) * hi // n_chunks) for k in range(n_chunks)]
    for lo, up in _progress(bounds, progress, contract):
        filtered = not (lo == 0 and up == BUCKETS)
        table = _collect(shards, contract, key, lo, up, filtered, item_ids, derive_notes)
        if table.num_rows == 0 and n_chunks > 1:
            continue  # an empty chunk says nothing; the not-empty rule ran on the others
        validated += table.num_rows
        runner.run(derive.to_pandas(table, derive.RAW_COLUMNS[contract]))
    if runner.chunks == 0:  # every chunk empty (sample of nothing): still run once, on no rows
        runner.run(derive.to_pandas(_collect(shards, contract, key, 0, 0, True, item_ids, derive_notes),
                                    derive.RAW_COLUMNS[contract]))
    return validated


# ---------------------------------------------------------------------------------------------
# Locating the data, its metadata and its items table

def _find_shards(path: Path, contract: str) -> list[Path]:
    if path.is_file():
        return [path]
    if list(path.glob("part-*.parquet")):
        return shard_paths(path)
    if contract == "examples":
        splits = [path / s for s in SPLITS if (path / s).is_dir() and list((path / s).glob("part-*.parquet"))]
        if splits:  # an EX root: validate every split together (catches duplicates across splits)
            return [p for s in splits for p in shard_paths(s)]
    sub = path / contract
    if sub.is_dir() and list(sub.glob("part-*.parquet")):
        return shard_paths(sub)  # a RAW / EX root: its events/ or items/ folder
    raise FileNotFoundError(f"no part-*.parquet shards for the '{contract}' contract in {path}")


def _nearest_meta(path: Path) -> tuple[dict | None, Path | None]:
    d = path if path.is_dir() else path.parent
    for candidate in [d, *list(d.parents)[:3]]:
        f = candidate / "meta.json"
        if f.is_file():
            try:
                return json.loads(f.read_text()), candidate
            except json.JSONDecodeError as e:
                raise FormatError(f"{f}: not valid JSON ({e})") from e
    return None, None


def _sibling_items(path: Path, meta_dir: Path | None) -> Path | None:
    d = path if path.is_dir() else path.parent
    for candidate in [d, *list(d.parents)[:2], *([meta_dir] if meta_dir else [])]:
        items = candidate / "items"
        if items.is_dir() and items.resolve() != d.resolve() and list(items.glob("part-*.parquet")):
            return items
    return None


def _action_ids(actions, meta: dict | None) -> list[int] | None:
    if actions is None:
        names = (meta or {}).get("actions")
        if names is None:
            return None
        if not isinstance(names, list) or not names:
            raise FormatError(f"meta.json 'actions' must be a non-empty list of names by id, got {names!r}")
        return list(range(len(names)))
    if isinstance(actions, ActionVocab):
        return list(range(actions.size))
    if isinstance(actions, str):
        return list(range(vocab_for(actions).size))
    return list(range(len(ActionVocab(tuple(actions)).names)))


def _read_item_ids(items_path: Path, notes: list[str]) -> pa.Array | None:
    ids = []
    for p in shard_paths(items_path):
        pf = pq.ParquetFile(p)
        if "item_id" not in pf.schema_arrow.names:
            notes.append(f"referential integrity NOT checked: {p} has no item_id column")
            return None
        ids.append(pf.read(columns=["item_id"]).column("item_id"))
    col = pa.chunked_array([c for t in ids for c in t.chunks]) if ids else pa.chunked_array([], pa.int64())
    try:
        col = col.cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        notes.append(f"referential integrity NOT checked: item_id in {items_path} is {col.type}, not an integer")
        return None
    return col.combine_chunks().drop_null().unique()


def _load_suite(suite, contract: str) -> dict:
    if suite is None:
        return suite_dict(contract)
    if isinstance(suite, dict):
        return suite
    p = Path(suite)
    if not p.is_file():
        raise FileNotFoundError(f"suite file {p} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"suite file {p}: not valid JSON ({e})") from e


def _param_summary(params: dict) -> dict:
    out = dict(params)
    if "action_ids" in out and len(out["action_ids"]) > 20:
        out["action_ids"] = f"{len(out['action_ids'])} ids"
    return out


# ---------------------------------------------------------------------------------------------
# Chunking

def _plan(total: int, chunk_rows: int, sample_rows: int | None) -> tuple[int, int]:
    """(number of buckets selected, number of chunks)."""
    hi = BUCKETS
    if sample_rows is not None and sample_rows < total:
        hi = max(1, math.ceil(BUCKETS * sample_rows / total))
    expected = total * hi / BUCKETS
    return hi, max(1, min(hi, math.ceil(expected / chunk_rows)))


def _buckets(keys: np.ndarray) -> np.ndarray:
    return ((keys.astype(np.uint64) * _GOLDEN) >> np.uint64(54)).astype(np.int64)  # top 10 bits


def _collect(shards: list[Path], contract: str, key: str, lo: int, up: int, filtered: bool,
             item_ids, notes: set[str]) -> pa.Table:
    """The derived flat table of every row whose key bucket is in [lo, up)."""
    wanted = derive.RAW_COLUMNS[contract] + (["history", "slate"] if contract == "examples" else [])
    order = derive.OrderState() if contract == "events" else None
    parts: list[pa.Table] = []
    row0 = 0
    empty_schema = None
    for p in shards:
        pf = pq.ParquetFile(p)
        cols = [c for c in wanted if c in pf.schema_arrow.names]
        empty_schema = empty_schema or pa.schema([pf.schema_arrow.field(c) for c in cols])
        for batch in pf.iter_batches(batch_size=65_536, columns=cols):
            in_order = order.update(batch) if order is not None else None  # before filtering: needs neighbours
            if filtered:
                k = derive.as_int64(batch.column(key)) if key in batch.schema.names else None
                if k is None:
                    notes.add(f"'{key}' is missing or not an integer: rows were chunked by position, so "
                              "uniqueness was checked within chunks only")
                    k = np.arange(row0, row0 + batch.num_rows, dtype=np.int64)
                b = _buckets(k)
                mask = pa.array((b >= lo) & (b < up))
                row0 += batch.num_rows
                batch = batch.filter(mask)
                in_order = in_order.filter(mask) if in_order is not None else None
            if batch.num_rows:
                parts.append(derive.derive(contract, batch, item_ids=item_ids, in_order=in_order, notes=notes))
    if not parts:
        return derive.derive(contract, (empty_schema or pa.schema([])).empty_table(), item_ids=item_ids,
                             in_order=pa.array([], pa.bool_()) if contract == "events" else None, notes=notes)
    try:
        return pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise FormatError(f"the shards of {shards[0].parent} disagree on column types: {e}") from e


def _progress(bounds, enabled: bool, contract: str) -> Iterator:
    if not enabled or len(bounds) == 1:
        return iter(bounds)
    from tqdm import tqdm

    return iter(tqdm(bounds, desc=f"validating {contract}", unit="chunk"))
