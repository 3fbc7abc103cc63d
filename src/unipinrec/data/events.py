"""The user's own events (`data load --source events`): CSV or Parquet files -> the RAW layout.

A column mapping (`EventsMapping`, from flags or a small YAML file) names the columns of the
export; action values are names of the config's action vocabulary (or mapped onto them). Every
mismatch raises FormatError naming the file, the column and a few offending values; RAW is
written to a temporary folder beside the output, checked with the `events` data contract, and
renamed into place only when everything passed, so a failed load leaves nothing behind.

Events are read a file at a time and spilled into user-id ranges that are checked and sorted
one at a time, so memory follows the largest file or range (`partition_rows`), not the export.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from .. import format as fmt
from ..actions import ActionVocab

SUFFIXES = (".csv", ".csv.gz", ".parquet")
TS_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_SHOW = 3  # offending values shown in an error


@dataclass
class EventColumns:
    """Column names of the events export. Optional fields: None = the column of the field's own
    name when the file has one, else absent (request_id/position: no impressions; surface: 0)."""

    user: str = "user_id"
    item: str = "item_id"
    action: str = "action"
    ts: str = "ts"
    request_id: str | None = None
    position: str | None = None
    surface: str | None = None


@dataclass
class ItemColumns:
    item: str = "item_id"
    category: str | None = None  # default: a column named `category`, else 0
    title: str | None = None


@dataclass
class EventsMapping:
    """How an export maps onto the RAW layout (docs/data.md, `mapping.yaml`)."""

    events: EventColumns = field(default_factory=EventColumns)
    items: ItemColumns = field(default_factory=ItemColumns)
    actions: dict[str, str] = field(default_factory=dict)  # value in the file -> vocabulary name
    surfaces: dict[str, int] = field(default_factory=dict)  # value in the file -> surface id
    ts_unit: Literal["s", "ms", "us", "ns"] = "s"  # of numeric ts values; timestamp columns are exact
    events_files: str = ""  # glob under DIR; default events/*, else events.csv / events.parquet
    items_file: str = ""  # under DIR; default items.csv or items.parquet

    def validate(self) -> None:
        for value, sid in self.surfaces.items():
            if not 0 <= sid <= 127:
                raise ValueError(f"surfaces.{value}: surface id {sid} is outside 0..127")


def load_mapping(path: str | Path | None, **columns: str | None) -> EventsMapping:
    """The mapping from a YAML file (optional) with event column flags laid over it."""
    from ..config import from_dict, load_yaml

    data = load_yaml(path) if path else {}
    given = {k: v for k, v in columns.items() if v is not None}
    if given:
        data = {**data, "events": {**(data.get("events") or {}), **given}}
    return from_dict(EventsMapping, data, "mapping")


# ---------------------------------------------------------------------------------------------
# Reading and checking columns

def _files(root: Path, pattern: str, defaults: tuple[str, ...], what: str) -> list[Path]:
    for pat in ([pattern] if pattern else list(defaults)):
        found = sorted(p for p in root.glob(pat) if p.is_file() and p.name.endswith(SUFFIXES))
        if found:
            return found
    raise FileNotFoundError(f"{root}: no {what} file ({' or '.join([pattern] if pattern else defaults)}; "
                            f"CSV or Parquet)")


def _read(path: Path, columns: list[str] | None = None) -> pa.Table:
    """The file's table (only `columns`, when given and all present)."""
    try:
        if path.name.endswith(".parquet"):
            if columns and not set(columns) <= set(pq.read_schema(path).names):
                columns = None  # read it all: the error names the missing column and the file's columns
            return pq.read_table(path, columns=columns)
        opts = pcsv.ConvertOptions(strings_can_be_null=True)
        if columns and set(columns) <= set(pcsv.open_csv(path).schema.names):
            opts.include_columns = columns
        return pcsv.read_csv(path, convert_options=opts)
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            return pa.table({})
        raise fmt.FormatError(f"{path.name}: cannot be read as {'Parquet' if path.suffix == '.parquet' else 'CSV'}: "
                              f"{str(e).splitlines()[0]}") from None


def _show(values) -> str:
    values = [v.item() if isinstance(v, np.generic) else v for v in values]
    shown = ", ".join(repr(v) for v in values[:_SHOW])
    return shown + (f" ... ({len(values)} in all)" if len(values) > _SHOW else "")


def _rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    return f"data rows {_show(int(r) + 1 for r in rows)}"


class _File:
    """One file being read: its name and table, for errors that name both."""

    def __init__(self, path: Path, table: pa.Table):
        self.name, self.table = path.name, table

    def column(self, col: str, role: str) -> pa.ChunkedArray:
        if col not in self.table.column_names:
            raise fmt.FormatError(f"{self.name}: column '{col}' ({role}) not found; the file has columns "
                                  f"{self.table.column_names}")
        return self.table.column(col)

    def error(self, col: str, role: str, problem: str) -> fmt.FormatError:
        return fmt.FormatError(f"{self.name}: column '{col}' ({role}) {problem}")

    def _nulls(self, c: pa.ChunkedArray, col: str, role: str, nullable: bool) -> np.ndarray:
        nulls = c.is_null().to_numpy(zero_copy_only=False)
        if nulls.any() and not nullable:
            raise self.error(col, role, f"has {int(nulls.sum())} null values ({_rows(nulls)})")
        return nulls

    def ints(self, col: str, role: str, *, nullable: bool = False, lo: int = 0, hi: int = 2**63 - 1) -> np.ndarray:
        """An integer column as int64 (nulls -> -1 when nullable), with the offending values named."""
        c = self.column(col, role)
        nulls = self._nulls(c, col, role, nullable)
        if pa.types.is_integer(c.type):
            v = pc.fill_null(c, 0).to_numpy().astype(np.int64)
        elif pa.types.is_floating(c.type) or pa.types.is_string(c.type) or pa.types.is_large_string(c.type):
            v = self._numbers(c, col, role, "must hold integers", integral=True).astype(np.int64)
        else:
            raise self.error(col, role, f"must hold integers, got {c.type}")
        bad = ~nulls & ((v < lo) | (v > hi))
        if bad.any():
            raise self.error(col, role, f"must be in {lo}..{hi}; found {_show(v[bad])} ({_rows(bad)})")
        return np.where(nulls, -1, v)

    def _numbers(self, c: pa.ChunkedArray, col: str, role: str, problem: str, integral: bool) -> np.ndarray:
        """Float values of a float or text column (nulls -> 0); text that is no number is an error."""
        if pa.types.is_floating(c.type):
            x = pc.fill_null(c, 0.0).to_numpy()
            bad = ~np.isfinite(x) | ((x != np.floor(x)) if integral else False)
            if np.any(bad):
                raise self.error(col, role, f"{problem}; found {_show(x[bad])} ({_rows(bad)})")
            return x
        text = c.to_numpy(zero_copy_only=False)
        x = np.array([_number(t, integral) for t in text], np.float64)
        bad = np.isnan(x)
        if bad.any():
            raise self.error(col, role, f"{problem}; found {_show(text[bad])} ({_rows(bad)})")
        return x

    def ts(self, col: str, unit: str) -> np.ndarray:
        """Seconds since the epoch from a timestamp column, or from numbers in `unit`."""
        c = self.column(col, "ts")
        self._nulls(c, col, "ts", nullable=False)
        if pa.types.is_timestamp(c.type) or pa.types.is_date(c.type):
            return pc.cast(pc.cast(c, pa.timestamp("s"), safe=False), pa.int64()).to_numpy()
        if pa.types.is_integer(c.type):
            return c.to_numpy().astype(np.int64) // TS_UNITS[unit]
        if pa.types.is_floating(c.type):
            x = self._numbers(c, col, "ts", "is not numeric (seconds since the epoch, or a timestamp)", integral=False)
            return np.floor(x / TS_UNITS[unit]).astype(np.int64)
        if not (pa.types.is_string(c.type) or pa.types.is_large_string(c.type)):
            raise self.error(col, "ts", f"must be numeric (seconds since the epoch) or a timestamp, got {c.type}")
        text = c.to_numpy(zero_copy_only=False)  # numbers in `unit`, or ISO timestamps (a CSV column of both)
        x = np.array([_ts_seconds(t, TS_UNITS[unit]) for t in text], np.float64)
        bad = np.isnan(x)
        if bad.any():
            raise self.error(col, "ts", f"is not numeric (seconds since the epoch) or a timestamp; found "
                             f"{_show(text[bad])} ({_rows(bad)})")
        return x.astype(np.int64)

    def coded(self, col: str, role: str, codes: dict[str, int], what: str, *, ids: int | None = None) -> np.ndarray:
        """Values mapped through `codes` (name -> id); integer columns are ids when no mapping
        renames them (range-checked against `ids`)."""
        c = self.column(col, role)
        self._nulls(c, col, role, nullable=False)
        if pa.types.is_integer(c.type) and ids is not None:
            return self.ints(col, role, lo=0, hi=ids - 1)
        enc = pc.cast(c, pa.string()).combine_chunks().dictionary_encode()  # Arrow's hash: fast on text
        uniq, inv = enc.dictionary.to_numpy(zero_copy_only=False), enc.indices.to_numpy()
        known = np.array([u in codes for u in uniq])
        if not known.all():
            bad = ~known[inv]
            raise self.error(col, role, f"has values that are {'neither' if ' nor ' in what else 'not'} {what}: "
                             f"{_show(uniq[~known])} ({_rows(bad)})")
        return np.array([codes[u] for u in uniq], np.int64)[inv]


def _ts_seconds(text: str, per_second: int) -> float:
    """Seconds of a number in 1/per_second units or an ISO timestamp (UTC); NaN when neither."""
    x = _number(text, integral=False)
    if not np.isnan(x):
        return float(np.floor(x / per_second))
    try:
        return float(np.datetime64(text.strip().rstrip("Z").replace(" ", "T"), "s").astype(np.int64))
    except ValueError:
        return float("nan")


def _number(text: str | None, integral: bool) -> float:
    """float(text), NaN when it is not a number (or not an integer when `integral`); None -> 0."""
    if text is None:
        return 0.0
    try:
        x = float(int(text)) if integral else float(text)
    except ValueError:
        return float("nan")
    return x if np.isfinite(x) else float("nan")


# ---------------------------------------------------------------------------------------------
# Events and items of one file

def _optional(f: _File, given: str | None, default: str) -> str | None:
    if given is not None:
        return given
    return default if default in f.table.column_names else None


def _items_of(f: _File, m: ItemColumns) -> pa.Table:
    if f.table.num_rows == 0:
        raise fmt.FormatError(f"{f.name}: no item rows (the file is empty)")
    item = f.ints(m.item, "item")
    uniq, counts = np.unique(item, return_counts=True)
    if (counts > 1).any():
        raise f.error(m.item, "item", f"has duplicate item ids: {_show(uniq[counts > 1])}")
    cat_col, title_col = _optional(f, m.category, "category"), _optional(f, m.title, "title")
    category = f.ints(cat_col, "category", hi=2**31 - 1) if cat_col else np.zeros(len(item), np.int64)
    title = pc.cast(f.column(title_col, "title"), pa.string()) if title_col else pa.nulls(len(item), pa.string())
    return pa.table({"item_id": pa.array(item), "category": pa.array(category, pa.int32()), "title": title},
                    schema=fmt.ITEMS_SCHEMA)


def _action_codes(m: EventsMapping, vocab: ActionVocab) -> dict[str, int]:
    codes = {name: i for i, name in enumerate(vocab.names)}
    for value, name in m.actions.items():
        if name not in codes:
            raise fmt.FormatError(f"mapping actions.{value}: '{name}' is not an action of the vocabulary "
                                  f"{list(vocab.names)}")
    return {**codes, **{value: codes[name] for value, name in m.actions.items()}}


def _events_of(f: _File, m: EventsMapping, vocab: ActionVocab, item_ids: np.ndarray, items_name: str) -> dict:
    """Canonical columns (numpy; request/position -1 where null) of one events file."""
    e, n = m.events, f.table.num_rows
    user = f.ints(e.user, "user")
    item = f.ints(e.item, "item")
    unknown = ~np.isin(item, item_ids)
    if unknown.any():
        raise f.error(e.item, "item", f"has ids missing from {items_name}: {_show(np.unique(item[unknown]))} "
                      f"({_rows(unknown)})")
    what = f"actions of the vocabulary {list(vocab.names)}"
    what += " nor renamed in the mapping's actions" if m.actions else ""
    action = f.coded(e.action, "action", _action_codes(m, vocab), what, ids=None if m.actions else vocab.size)
    ts = f.ts(e.ts, m.ts_unit)
    req_col, pos_col = _optional(f, e.request_id, "request_id"), _optional(f, e.position, "position")
    req = f.ints(req_col, "request_id", nullable=True) if req_col else np.full(n, -1)
    pos = f.ints(pos_col, "position", nullable=True, hi=2**15 - 1) if pos_col else np.full(n, -1)
    unpaired = (req >= 0) != (pos >= 0)
    if unpaired.any():
        col = pos_col if (req >= 0)[unpaired][0] else req_col
        raise fmt.FormatError(f"{f.name}: column '{col}' is null on rows where the other of request_id/position is "
                              f"set (feed rows need both, organic rows neither): {_rows(unpaired)}")
    surf_col = _optional(f, e.surface, "surface")
    if surf_col is None:
        surface = np.zeros(n, np.int64)
    elif m.surfaces:
        surface = f.coded(surf_col, "surface", dict(m.surfaces), "surface names of the mapping's surfaces")
    else:
        surface = f.ints(surf_col, "surface", hi=127)
    return {"user_id": user, "item_id": item, "action": action, "ts": ts, "surface": surface, "request_id": req,
            "position": pos}


# ---------------------------------------------------------------------------------------------
# Checks across files

def _check_duplicates(cols: dict, files: np.ndarray, names: list[str], vocab: ActionVocab) -> None:
    keys = ("user_id", "item_id", "action", "ts", "request_id", "position", "surface")
    order = np.lexsort([cols[k] for k in reversed(keys)])
    same = np.ones(len(order) - 1, bool) if len(order) > 1 else np.zeros(0, bool)
    for k in keys:
        v = cols[k][order]
        same &= v[1:] == v[:-1]
    if same.any():
        dup = order[1:][same]
        i = int(dup[0])
        first = f"user {cols['user_id'][i]}, item {cols['item_id'][i]}, action '{vocab.names[cols['action'][i]]}', " \
                f"ts {cols['ts'][i]}" + (f", request_id {cols['request_id'][i]}" if cols["request_id"][i] >= 0 else "")
        raise fmt.FormatError(f"{names[files[i]]}: {len(dup)} duplicate events (the same user, item, action, ts, "
                              f"request_id, position and surface twice), e.g. {first}")


def _check_requests(cols: dict, files: np.ndarray, names: list[str]) -> None:
    """Every feed request is one user's, at one time (its rows carry request_ts)."""
    feed = np.flatnonzero(cols["request_id"] >= 0)
    if not len(feed):
        return
    req = cols["request_id"][feed]
    order = np.argsort(req, kind="stable")
    r, u, t = req[order], cols["user_id"][feed][order], cols["ts"][feed][order]
    bad = (r[1:] == r[:-1]) & ((u[1:] != u[:-1]) | (t[1:] != t[:-1]))
    if bad.any():
        rows = feed[order][1:][bad]
        raise fmt.FormatError(f"{names[files[rows[0]]]}: request_id {_show(np.unique(r[1:][bad]))} has rows of "
                              f"different users or ts (all rows of a feed request share its user and request time)")


def _events_table(cols: dict) -> pa.Table:
    order = np.lexsort((cols["position"], cols["request_id"], cols["ts"], cols["user_id"]))  # stable: file order
    c = {k: v[order] for k, v in cols.items()}
    req, pos = c["request_id"], c["position"]
    return pa.table({"user_id": c["user_id"], "item_id": c["item_id"], "action": pa.array(c["action"], pa.int8()),
                     "ts": c["ts"], "surface": pa.array(c["surface"], pa.int8()),
                     "request_id": pa.array(req, pa.int64(), mask=req < 0),
                     "position": pa.array(pos, pa.int16(), mask=pos < 0)}, schema=fmt.EVENTS_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Loading

def _check_tasks(tasks, vocab: ActionVocab) -> None:
    """The config's positive actions and tasks must name actions of the vocabulary."""
    named = [("positive_actions", a) for a in tasks.positive_actions]
    named += [(f"tasks.{t}", a) for t, acts in tasks.tasks.items() for a in acts]
    for where, a in named:
        if a not in vocab.names:
            raise fmt.FormatError(f"config {where}: '{a}' is not an action of the vocabulary {list(vocab.names)}")


class _Export:
    """The files of an export, the mapping that reads them and the checked item table.

    Events are read one file at a time, checked, and spilled into user-id ranges of about
    `partition_rows` events; each range is then checked across files (duplicates, requests),
    sorted and written, so memory follows the largest file or range, not the export."""

    def __init__(self, path: str | Path, mapping: EventsMapping, vocab: ActionVocab):
        self.root, self.mapping, self.vocab = Path(path), mapping, vocab
        if not self.root.is_dir():
            raise FileNotFoundError(f"events: folder {self.root} not found")
        _action_codes(mapping, vocab)  # the mapping is checked before any file is read
        items_path = _files(self.root, mapping.items_file, ("items.csv", "items.csv.gz", "items.parquet"), "items")[0]
        self.items = _items_of(_File(items_path, _read(items_path)), mapping.items)
        self.items_name = items_path.name
        self.paths = _files(self.root, mapping.events_files,
                            ("events/*", "events.csv", "events.csv.gz", "events.parquet"), "events")
        self.names = [str(p.relative_to(self.root)) for p in self.paths]

    def _edges(self, partition_rows: int) -> np.ndarray:
        """User-id range bounds of the partitions (first pass: the user column only)."""
        lows, highs, rows = [], [], 0
        for p in self.paths:
            f = _File(p, _read(p, [self.mapping.events.user]))
            if f.table.num_rows:
                user = f.ints(self.mapping.events.user, "user")
                lows.append(int(user.min()))
                highs.append(int(user.max()))
                rows += len(user)
        if not rows:
            many = len(self.names) > 1
            raise fmt.FormatError(f"{', '.join(self.names)}: no event rows "
                                  f"(the file{'s are' if many else ' is'} empty)")
        n = max(1, -(-rows // partition_rows))
        lo, span = min(lows), max(highs) + 1 - min(lows)
        return np.array([lo + span * k // n for k in range(1, n)], np.int64)  # inner bounds: n ranges

    def _spill(self, spill: Path, edges: np.ndarray) -> None:
        item_ids = self.items.column("item_id").to_numpy()
        for i, p in enumerate(self.paths):
            f = _File(p, _read(p))
            if not f.table.num_rows:
                continue
            cols = _events_of(f, self.mapping, self.vocab, item_ids, self.items_name)
            cols["file"], cols["row"] = np.full(f.table.num_rows, i), np.arange(f.table.num_rows)
            part = np.searchsorted(edges, cols["user_id"], side="right")
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(len(edges) + 2))
            for k in np.flatnonzero(np.diff(bounds)):
                sel = order[bounds[k]:bounds[k + 1]]
                part_dir = spill / f"p{k:05d}"
                part_dir.mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.table({c: v[sel] for c, v in cols.items()}), part_dir / f"f{i:05d}.parquet")

    def write_events(self, events_dir: Path, spill: Path, *, partition_rows: int, rows_per_shard: int) -> dict:
        """Check, sort and write every event to events_dir; returns the counts for meta.json."""
        edges = self._edges(partition_rows)
        self._spill(spill, edges)
        stats = {"num_events": 0, "num_users": 0, "num_requests": 0, "partitions": len(edges) + 1}
        max_position = -1
        with fmt.ShardedWriter(events_dir, fmt.EVENTS_SCHEMA, rows_per_shard) as w:
            for d in sorted(spill.iterdir()):
                t = pa.concat_tables([pq.read_table(p) for p in sorted(d.iterdir())])
                cols = {c: t.column(c).to_numpy() for c in t.column_names}
                _check_duplicates(cols, cols["file"], self.names, self.vocab)
                _check_requests(cols, cols["file"], self.names)
                w.write(_events_table(cols))
                feed = cols["request_id"] >= 0
                stats["num_events"] += len(cols["user_id"])
                stats["num_users"] += len(np.unique(cols["user_id"]))
                stats["num_requests"] += len(np.unique(cols["request_id"][feed]))
                max_position = max(max_position, int(cols["position"].max()))
        info = {**stats, "files": self.names, "items_file": self.items_name}
        if stats["num_requests"]:  # the builder's default slate size: the whole slate
            info["config"] = {"slate_size": max_position + 1}
        return info


def read_events(path: str | Path, mapping: EventsMapping, vocab: ActionVocab, *,
                partition_rows: int = 2_000_000) -> tuple[pa.Table, pa.Table, dict]:
    """(events, items, info) as load_events would write them, in memory (for tests and small data)."""
    export = _Export(path, mapping, vocab)
    with tempfile.TemporaryDirectory(prefix="unipinrec-events-") as tmp:
        info = export.write_events(Path(tmp) / "events", Path(tmp) / "spill", partition_rows=partition_rows,
                                   rows_per_shard=2**62)
        return fmt.read_sharded(Path(tmp) / "events"), export.items, info


def _contract(raw: Path, vocab: ActionVocab) -> None:
    from ..contracts import validate

    report = validate(raw / "events", "events", items=raw / "items", actions=vocab)
    if not report.success:
        fails = "; ".join(f"{r.rule} on {r.column or 'the table'}: {r.unexpected_count:,} rows"
                          + (f", e.g. {r.examples[:_SHOW]}" if r.examples else "") for r in report.failed)
        raise fmt.FormatError(f"the loaded events break the events contract: {fails}")


def _replace_dir(out: Path, write) -> None:
    """write(tmp) into a temporary folder beside `out`, then rename it onto `out`; on any error
    nothing is left behind and `out` is unchanged."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").exists())):
        raise FileExistsError(f"{out} exists and is not a RAW dataset folder; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_events(path: str | Path, out_dir: str | Path, *, vocab: ActionVocab, vocab_source: str,
                mapping: EventsMapping | None = None, tasks=None, rows_per_shard: int = 1_000_000,
                partition_rows: int = 2_000_000, contract: bool = True) -> dict:
    """Read the export at `path`, check it, write RAW to `out_dir`; returns the meta it wrote.

    vocab_source: the config's data.source whose vocabulary the actions use; it is RAW's
    `source`, so examples and training resolve the same vocabulary. tasks: a TaskConfig to check.
    partition_rows: events per user-id range that is sorted and checked in memory at once.
    """
    from ..config import to_dict

    mapping = mapping or EventsMapping()
    if tasks is not None:
        _check_tasks(tasks, vocab)
    export = _Export(path, mapping, vocab)
    meta = {"source": vocab_source, "loaded_from": "events", "path": str(path), "actions": list(vocab.names),
            "num_items": export.items.num_rows, "ts_unit": "seconds", "mapping": to_dict(mapping)}

    def write(tmp: Path) -> None:
        info = export.write_events(tmp / "events", tmp / ".spill", partition_rows=partition_rows,
                                   rows_per_shard=rows_per_shard)
        shutil.rmtree(tmp / ".spill")
        meta.update(info, has_impressions=info["num_requests"] > 0)
        fmt.write_sharded(tmp / "items", export.items, fmt.ITEMS_SCHEMA, rows_per_shard)
        fmt.write_meta(tmp, meta)
        if contract:
            _contract(tmp, vocab)

    _replace_dir(Path(out_dir), write)
    return meta
