"""Feast adapter: the user history as a point-in-time feature, shared by training and serving.

- `write_sources(raw, repo)` derives the Feast batch sources from RAW events: one row per
  (user, distinct action time t) holding the user's last L history actions with ts <= t, and
  one row per item. A snapshot's `event_timestamp` is t + 1 s: Feast joins the latest row with
  `event_timestamp <= entity timestamp`, so a lookup at `request_ts` sees exactly the actions
  with ts < request_ts (timestamps are whole seconds) and nothing at or after it.
- `build_feature_store(raw, repo)` copies the definitions in `feature_repo/`, writes the
  sources, runs `feast apply` and materializes the online store.
- `historical_histories` / `attach_histories` read histories with `get_historical_features`
  (offline, for examples); `OnlineHistoryLookup` reads the same history from the online store
  (serving, when a request carries only `user_id`; it implements the serving engine's
  `OnlineStore` protocol, and `online_store` is the factory a model archive names).

History = the user's non-impression actions (action != 0), or with `history_impressions`
(`data.history_impressions`) all actions including earlier impressions: the rule of
`unipinrec.data.examples`, ordered by (ts, request_id, position) with organic actions first.
The store records its rule in feature_meta.json and `attach_histories` refuses examples built
with the other one.
Feast is imported inside functions only: importing it sets PROMETHEUS_MULTIPROC_DIR and
imports torch, which the rest of the library must not pay for.
"""
from __future__ import annotations

import warnings

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import format as fmt

PROJECT = "unipinrec"
HISTORY_VIEW = "user_history"
ITEM_VIEW = "item_features"
FEATURE_SERVICE = "unipinrec_v1"  # what the model reads; versioned in feature_repo/feature_services.py
ENVIRONMENTS = ("local", "cluster")
HISTORY_FIELDS = ("hist_item_ids", "hist_actions", "hist_ts", "hist_surfaces", "hist_len")
SNAPSHOT_DELAY_S = 1  # a snapshot of actions at t becomes visible at t + 1 s (see module doc)

_HISTORY_TYPE = fmt.UNIFIED_EXAMPLE_SCHEMA.field("history").type
_DEFINITION_FILES = ("entities.py", "data_sources.py", "user_history.py", "item_features.py",
                     "feature_services.py", ".feastignore")

USER_HISTORY_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("event_timestamp", pa.timestamp("s", tz="UTC"), nullable=False),
    pa.field("hist_item_ids", pa.list_(pa.int64()), nullable=False),
    pa.field("hist_actions", pa.list_(pa.int32()), nullable=False),
    pa.field("hist_ts", pa.list_(pa.int64()), nullable=False),
    pa.field("hist_surfaces", pa.list_(pa.int32()), nullable=False),
    pa.field("hist_len", pa.int64(), nullable=False),
])

ITEM_FEATURES_SCHEMA = pa.schema([
    pa.field("item_id", pa.int64(), nullable=False),
    pa.field("event_timestamp", pa.timestamp("s", tz="UTC"), nullable=False),
    pa.field("category", pa.int64(), nullable=False),
    pa.field("title", pa.string(), nullable=True),
])


class FeatureStoreError(RuntimeError):
    """The feature repo is missing, not built, or does not match the examples."""


# ---------------------------------------------------------------------------------------------
# The repo: definitions (from feature_repo/) + data/ (sources, registry, online store)

def default_template() -> Path:
    """`feature_repo/` of this checkout (editable install), or of the working directory (the
    project image copies the repository's folders into its WORKDIR and installs the package)."""
    candidates = [Path(__file__).resolve().parents[2] / "feature_repo", Path.cwd() / "feature_repo"]
    for path in candidates:
        if (path / "feature_services.py").exists():
            return path
    raise FeatureStoreError(f"feature repo definitions not found in {' or '.join(map(str, candidates))}; "
                            "pass template=PATH to feature_repo/")


def prepare_repo(repo_dir: str | Path, template: str | Path | None = None) -> Path:
    """Copy the Feast definitions and environment configs into `repo_dir` (data/ is made empty)."""
    src = Path(template) if template else default_template()
    repo = Path(repo_dir)
    repo.mkdir(parents=True, exist_ok=True)
    for name in _DEFINITION_FILES:
        if not (src / name).exists():
            raise FeatureStoreError(f"{src}: missing feature repo file {name}")
        shutil.copyfile(src / name, repo / name)
    for env in ENVIRONMENTS:
        (repo / "environments" / env).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "environments" / env / "feature_store.yaml",
                        repo / "environments" / env / "feature_store.yaml")
    if (repo / "data").exists():
        shutil.rmtree(repo / "data")  # a rebuilt store never mixes with an old registry or online db
    (repo / "data").mkdir()
    return repo


def _history_rows(events_dir: Path, history_impressions: bool = False) -> dict[str, np.ndarray]:
    """History actions of all users, sorted like the example builder: (user, ts, request, position).
    Impressions (action 0) are history only with `history_impressions`."""
    cols = ["user_id", "item_id", "action", "ts", "surface", "request_id", "position"]
    t = fmt.read_sharded(events_dir, columns=cols)
    if not history_impressions:
        t = t.filter(pc.not_equal(t.column("action"), fmt.IMPRESSION_ACTION))
    user, ts = t.column("user_id").to_numpy(), t.column("ts").to_numpy()
    req = pc.fill_null(t.column("request_id"), -1).to_numpy()
    pos = pc.fill_null(t.column("position"), -1).to_numpy()
    order = np.lexsort((pos, req, ts, user))
    return {
        "user": user[order], "ts": ts[order],
        "item": t.column("item_id").to_numpy()[order],
        "action": t.column("action").to_numpy()[order].astype(np.int32),
        "surface": t.column("surface").to_numpy()[order].astype(np.int32),
    }


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total)


def _snapshot_table(r: dict[str, np.ndarray], begins: np.ndarray, ends: np.ndarray, users: np.ndarray,
                    stamps: np.ndarray) -> pa.Table:
    """Rows of the history source: history rows [begin, end) of `r` for each snapshot."""
    lengths = (ends - begins).astype(np.int64)
    rows = _ranges(begins.astype(np.int64), lengths)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def lists(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values[rows], typ))

    return pa.Table.from_arrays(
        [
            pa.array(users, pa.int64()),
            pa.array(stamps, pa.int64()).cast(pa.timestamp("s", tz="UTC")),
            lists(r["item"], pa.int64()), lists(r["action"], pa.int32()), lists(r["ts"], pa.int64()),
            lists(r["surface"], pa.int32()), pa.array(lengths, pa.int64()),
        ],
        schema=USER_HISTORY_SCHEMA,
    )


def history_snapshots(events_dir: str | Path, max_history: int,
                      at: tuple[np.ndarray, np.ndarray] | None = None, *,
                      history_impressions: bool = False) -> pa.Table:
    """The user-history source table (USER_HISTORY_SCHEMA).

    at=None: one row after every distinct action time t of a user (actions with ts <= t,
    stamped t + 1 s): exact for a lookup at any time; rows = distinct (user, ts), each up to L.
    at=(user_ids, times): one row per given (user, time) holding the actions with ts < time,
    stamped at that time (a lookup at exactly those times is exact, between them it sees the
    latest earlier snapshot, never a later action), plus each user's full history stamped
    last ts + 1 s for the online store. Rows = requests + users: what scales to long histories.
    history_impressions: impressions (action 0) are history too (the example builder's option).
    """
    if max_history <= 0:
        raise ValueError(f"max_history must be positive, got {max_history}")
    r = _history_rows(Path(events_dir), history_impressions)
    user, ts = r["user"], r["ts"]
    n = len(user)
    if n == 0:
        return USER_HISTORY_SCHEMA.empty_table()
    first_of_user = np.ones(n, dtype=bool)
    first_of_user[1:] = user[1:] != user[:-1]
    user_start = np.maximum.accumulate(np.where(first_of_user, np.arange(n), 0))
    last_of_user = np.r_[first_of_user[1:], True]
    ends = np.flatnonzero(last_of_user) + 1  # the final state of every user (end exclusive)
    final = (np.maximum(user_start[ends - 1], ends - max_history), ends, user[ends - 1],
             ts[ends - 1] + SNAPSHOT_DELAY_S)
    if at is None:
        last_of_time = np.ones(n, dtype=bool)  # last row of each (user, ts) group: a snapshot ends here
        last_of_time[:-1] = (user[1:] != user[:-1]) | (ts[1:] != ts[:-1])
        e = np.flatnonzero(last_of_time) + 1
        return _snapshot_table(r, np.maximum(user_start[e - 1], e - max_history), e, user[e - 1],
                               ts[e - 1] + SNAPSHOT_DELAY_S)
    q_user = np.asarray(at[0], dtype=np.int64)
    q_ts = np.asarray(at[1], dtype=np.int64)
    uniq = user[first_of_user]  # users with history, ascending (rows are sorted by user)
    rank = np.searchsorted(uniq, q_user)
    known = (rank < len(uniq)) & (uniq[np.minimum(rank, len(uniq) - 1)] == q_user)
    q_user, q_ts, rank = q_user[known], q_ts[known], rank[known]
    starts = np.flatnonzero(first_of_user)
    counts = np.diff(np.r_[starts, n])
    # actions of the user with ts < time: searchsorted inside the user's (time-sorted) rows
    t0 = int(min(ts.min(), q_ts.min() if len(q_ts) else ts.min()))
    span = np.int64(int(max(ts.max(), q_ts.max() if len(q_ts) else ts.max())) - t0 + 2)
    key = np.repeat(np.arange(len(uniq), dtype=np.int64), counts) * span + (ts - t0)
    e = np.searchsorted(key, rank * span + (q_ts - t0), side="left")
    b = np.maximum(starts[rank], e - max_history)
    keep = e > b  # a request before the user's first action has nothing to snapshot
    table = _snapshot_table(r, np.r_[b[keep], final[0]], np.r_[e[keep], final[1]],
                            np.r_[q_user[keep], final[2]], np.r_[q_ts[keep], final[3]])
    # one row per (user, stamp): the final row wins over a request at the same second
    stamps = table.column("event_timestamp").cast(pa.int64()).to_numpy()
    uid = table.column("user_id").to_numpy()
    order = np.lexsort((-np.arange(len(uid)), stamps, uid))
    dup = np.r_[False, (uid[order][1:] == uid[order][:-1]) & (stamps[order][1:] == stamps[order][:-1])]
    return table.take(pa.array(np.sort(order[~dup])))


def request_times(raw_dir: str | Path, max_history: int, slate_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids, request_ts) of every example the example builder makes from RAW: the times
    the training examples look histories up at (the same whatever the history rule)."""
    import tempfile

    from .data import build_examples

    with tempfile.TemporaryDirectory(prefix="unipinrec-req-") as tmp:
        build_examples(raw_dir, tmp, max_history=max_history, slate_size=slate_size, progress=False)
        parts = [fmt.read_sharded(Path(tmp) / s, columns=["user_id", "request_ts"]) for s in fmt.SPLITS]
    t = pa.concat_tables(parts)
    return t.column("user_id").to_numpy(), t.column("request_ts").to_numpy()


def item_rows(raw_dir: str | Path) -> pa.Table:
    """The item source table: static attributes, valid from the dataset's first event."""
    raw = Path(raw_dir)
    items = fmt.read_sharded(raw / "items", columns=["item_id", "category", "title"])
    first = pc.min(fmt.read_sharded(raw / "events", columns=["ts"]).column("ts")).as_py() or 0
    valid_from = pa.array(np.full(items.num_rows, first, dtype=np.int64)).cast(pa.timestamp("s", tz="UTC"))
    return pa.Table.from_arrays(
        [items.column("item_id"), valid_from, items.column("category").cast(pa.int64()), items.column("title")],
        schema=ITEM_FEATURES_SCHEMA,
    )


def write_sources(raw_dir: str | Path, repo_dir: str | Path, max_history: int,
                  at: tuple[np.ndarray, np.ndarray] | None = None, *, history_impressions: bool = False) -> dict:
    """Write data/user_history.parquet and data/item_features.parquet into the repo
    (`at`: snapshot times, `history_impressions`: the history rule; see `history_snapshots`)."""
    raw, data = Path(raw_dir), Path(repo_dir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    hist = history_snapshots(raw / "events", max_history, at, history_impressions=history_impressions)
    pq.write_table(hist, data / "user_history.parquet", compression="zstd")
    items = item_rows(raw)
    pq.write_table(items, data / "item_features.parquet", compression="zstd")
    ts = pa.concat_arrays([hist.column("event_timestamp").combine_chunks(), items.column("event_timestamp").combine_chunks()])
    return {
        "history_rows": hist.num_rows,
        "history_users": len(pc.unique(hist.column("user_id"))),
        "item_rows": items.num_rows,
        "max_history": max_history,
        "history_impressions": bool(history_impressions),
        "snapshots": "every action" if at is None else "requests + latest",
        "first_ts": int(pc.min(ts).cast(pa.int64()).as_py() or 0),
        "last_ts": int(pc.max(ts).cast(pa.int64()).as_py() or 0),
    }


# ---------------------------------------------------------------------------------------------
# Feast: apply, materialize, open

def _yaml(repo: Path, env: str) -> Path:
    if env not in ENVIRONMENTS:
        raise ValueError(f"env '{env}' is not one of {list(ENVIRONMENTS)}")
    path = repo / "environments" / env / "feature_store.yaml"
    if not path.exists():
        raise FeatureStoreError(f"{path} not found: is {repo} a feature repo (unipinrec.features.prepare_repo)?")
    return path


def open_store(repo_dir: str | Path, env: str = "local"):
    """A `feast.FeatureStore` over the repo with the environment's feature_store.yaml."""
    from feast import FeatureStore

    repo = Path(repo_dir).resolve()
    return FeatureStore(repo_path=str(repo), fs_yaml_file=_yaml(repo, env))


@contextmanager
def _cwd(repo: Path) -> Iterator[None]:
    """Feast's DuckDB offline store reads a relative FileSource path against the working
    directory, not the repo (feast 0.67): offline reads run from inside the repo."""
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        yield
    finally:
        os.chdir(cwd)


@contextmanager
def _inside_repo(repo: Path) -> Iterator[None]:
    """What `feast apply` needs (cwd = repo, repo on sys.path), undone afterwards, including the
    definition modules it imports (their generic names must not shadow anything later)."""
    names = [p.stem for p in repo.glob("*.py")]
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    cwd = os.getcwd()
    sys.path.insert(0, str(repo))
    os.chdir(repo)
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.path.remove(str(repo))
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def apply(repo_dir: str | Path, env: str = "local") -> None:
    """`feast apply`: import every definition file of the repo (minus .feastignore) and register it."""
    from feast.repo_operations import apply_total

    repo = Path(repo_dir).resolve()
    store = open_store(repo, env)
    with _inside_repo(repo):
        apply_total(store.config, repo, skip_source_validation=False)


def materialize(repo_dir: str | Path, env: str = "local", *, start_ts: int | None = None,
                end_ts: int | None = None) -> None:
    """Load the latest feature rows in [start_ts, end_ts] into the online store."""
    from datetime import datetime, timezone

    repo = Path(repo_dir).resolve()
    if start_ts is None or end_ts is None:
        meta = read_feature_meta(repo)
        start_ts = meta["sources"]["first_ts"] if start_ts is None else start_ts
        end_ts = meta["sources"]["last_ts"] if end_ts is None else end_ts
    store = open_store(repo, env)
    with _cwd(repo), _quiet_ibis():
        store.materialize(
            start_date=datetime.fromtimestamp(start_ts - 1, tz=timezone.utc),
            end_date=datetime.fromtimestamp(end_ts + 1, tz=timezone.utc),
        )


@contextmanager
def _quiet_ibis():
    """Feast's DuckDB store calls an ibis method ibis 12 deprecates (third-party, harmless)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"fetch_arrow_table\(\) is deprecated", category=DeprecationWarning)
        yield


def read_feature_meta(repo_dir: str | Path) -> dict:
    path = Path(repo_dir) / "feature_meta.json"
    if not path.exists():
        raise FeatureStoreError(f"{path} not found: build the store first (unipinrec.features.build_feature_store)")
    return json.loads(path.read_text())


def build_feature_store(raw_dir: str | Path, repo_dir: str | Path, *, max_history: int, env: str = "local",
                        template: str | Path | None = None, online: bool = True,
                        at: tuple[np.ndarray, np.ndarray] | None = None, history_impressions: bool = False) -> dict:
    """RAW -> a ready feature repo: definitions, sources, registry (apply), online store (materialize).

    `at`: (user_ids, times) to snapshot histories at (e.g. `request_times(raw, L)`); None
    snapshots after every action. `history_impressions`: impressions (action 0) are history too.
    Returns (and writes to REPO/feature_meta.json) row counts and
    the seconds each stage took.
    """
    repo = prepare_repo(repo_dir, template)
    seconds = {}
    t0 = time.perf_counter()
    sources = write_sources(raw_dir, repo, max_history, at, history_impressions=history_impressions)
    seconds["write_sources"] = time.perf_counter() - t0
    meta = {"project": PROJECT, "feature_service": FEATURE_SERVICE, "env": env, "raw": str(raw_dir),
            "sources": sources, "seconds": seconds}
    (repo / "feature_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    t0 = time.perf_counter()
    apply(repo, env)
    seconds["apply"] = time.perf_counter() - t0
    if online:
        t0 = time.perf_counter()
        materialize(repo, env)
        seconds["materialize"] = time.perf_counter() - t0
    meta["online"] = online
    (repo / "feature_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------
# Reading histories: offline (point in time) and online (latest)

def _to_history(item, action, ts, surface) -> pa.ListArray:
    """Four parallel list columns (a null list = no history yet) -> unified-format history lists."""
    def filled(col: pa.ChunkedArray | pa.Array) -> pa.Array:
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        return pc.if_else(pc.is_valid(col), col, pa.scalar([], col.type)) if col.null_count else col

    item, action, ts, surface = (filled(c) for c in (item, action, ts, surface))
    lengths = pc.list_value_length(item).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.StructArray.from_arrays(
        [pc.list_flatten(item).cast(pa.int64()), pc.list_flatten(action).cast(pa.int8()),
         pc.list_flatten(ts).cast(pa.int64()), pc.list_flatten(surface).cast(pa.int8())],
        fields=list(_HISTORY_TYPE.value_type),
    )
    return pa.ListArray.from_arrays(offsets, values, type=_HISTORY_TYPE)


def historical_histories(repo_dir: str | Path, user_ids: Sequence[int] | np.ndarray,
                         request_ts: Sequence[int] | np.ndarray, *, env: str = "local", store=None) -> pa.ListArray:
    """Point-in-time histories through `get_historical_features`, in the order of the inputs.

    Each history holds the user's last L actions with ts < request_ts (L: the store's max_history).
    """
    import pandas as pd

    store = store or open_store(repo_dir, env)
    users = np.asarray(user_ids, dtype=np.int64)
    when = np.asarray(request_ts, dtype=np.int64)
    if users.shape != when.shape:
        raise ValueError(f"user_ids ({users.shape}) and request_ts ({when.shape}) differ in length")
    if len(users) == 0:
        return pa.array([], type=_HISTORY_TYPE)
    entity_df = pd.DataFrame({
        "user_id": users,
        "event_timestamp": pd.to_datetime(when, unit="s", utc=True),
        "row": np.arange(len(users), dtype=np.int64),  # Feast may reorder rows; this puts them back
    })
    with _cwd(Path(store.repo_path)), _quiet_ibis():
        job = store.get_historical_features(entity_df=entity_df, features=store.get_feature_service(FEATURE_SERVICE))
        table = job.to_arrow()
    found = table.column("row").to_numpy()
    if len(np.unique(found)) != len(found):
        raise FeatureStoreError("get_historical_features returned more than one row per (user_id, request_ts)")
    # The file offline store drops entity rows that no feature row precedes (a user's first
    # request): they come back as null, i.e. an empty history.
    where = np.full(len(users), -1, dtype=np.int64)
    where[found] = np.arange(len(found))
    picks = pa.array(where, mask=where < 0)
    return _to_history(*(table.column(f).take(picks) for f in HISTORY_FIELDS[:4]))


def attach_histories(examples_dir: str | Path, repo_dir: str | Path, out_dir: str | Path | None = None, *,
                     env: str = "local", splits: Sequence[str] = fmt.SPLITS) -> dict:
    """Replace the history of every example by its Feast point-in-time history.

    Writes to `out_dir` (default: in place) and returns, per split, the number of examples and
    how many histories differ from the ones the example builder computed (0 means training reads
    exactly what the builder's rule gives).
    """
    ex = Path(examples_dir)
    out = Path(out_dir) if out_dir else ex
    meta = fmt.read_meta(ex)
    store_meta = read_feature_meta(repo_dir)
    L = int(meta.get("max_history", 0))
    if store_meta["sources"]["max_history"] < L:
        raise FeatureStoreError(f"feature store keeps {store_meta['sources']['max_history']} actions per history, "
                                f"the examples need max_history={L}")
    # stores and examples from before the option have no key: they hold the default rule
    want = bool(meta.get("history_impressions", False))
    have = bool(store_meta["sources"].get("history_impressions", False))
    if have != want:
        raise FeatureStoreError(f"feature store was built with history_impressions={have}, the examples in "
                                f"{ex} with history_impressions={want}: rebuild the store with "
                                f"data.history_impressions: {str(want).lower()}")
    store = open_store(repo_dir, env)
    stats = {}
    for split in splits:
        table = fmt.read_sharded(ex / split)
        feast_hist = historical_histories(repo_dir, table.column("user_id").to_numpy(),
                                          table.column("request_ts").to_numpy(), env=env, store=store)
        if L and store_meta["sources"]["max_history"] > L:
            feast_hist = _keep_last(feast_hist, L)
        builder_hist = table.column("history").combine_chunks()
        differ = int(pc.sum(pc.invert(_lists_equal(builder_hist, feast_hist))).as_py() or 0)
        table = table.set_column(table.schema.get_field_index("history"), "history", feast_hist)
        fmt.write_sharded(out / split, table, fmt.UNIFIED_EXAMPLE_SCHEMA)
        stats[split] = {"examples": table.num_rows, "history_differs_from_builder": differ}
    if out != ex:
        for extra in ("items", "oracle"):
            if (ex / extra).exists():
                shutil.copytree(ex / extra, out / extra, dirs_exist_ok=True)
    fmt.write_meta(out, {**meta, "history_source": f"feast:{FEATURE_SERVICE}", "feast": stats})
    return stats


def _keep_last(hist: pa.ListArray, L: int) -> pa.ListArray:
    lengths = pc.list_value_length(hist).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = hist.offsets.to_numpy()[:-1].astype(np.int64) + np.maximum(0, lengths - L)
    keep = np.minimum(lengths, L)
    rows = _ranges(starts, keep)
    offsets = pa.array(np.concatenate([[0], np.cumsum(keep)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, hist.values.take(pa.array(rows)), type=_HISTORY_TYPE)


def _lists_equal(a: pa.ListArray, b: pa.ListArray) -> pa.BooleanArray:
    """Row-wise equality of two history list arrays (same length)."""
    la = pc.list_value_length(a).to_numpy(zero_copy_only=False)
    lb = pc.list_value_length(b).to_numpy(zero_copy_only=False)
    same = la == lb
    va, vb = a.flatten(), b.flatten()
    if len(va) == len(vb) and np.array_equal(la, lb):
        eq = np.ones(len(va), dtype=bool)
        for f in ("item_id", "action", "ts", "surface"):
            eq &= va.field(f).to_numpy(zero_copy_only=False) == vb.field(f).to_numpy(zero_copy_only=False)
        row_of = np.repeat(np.arange(len(la)), la)
        bad = np.zeros(len(la), dtype=bool)
        np.logical_or.at(bad, row_of[~eq], True)
        same &= ~bad
    else:  # lengths differ somewhere: compare row by row where lengths agree
        for i in np.flatnonzero(same):
            same[i] = a[i].as_py() == b[i].as_py()
    return pa.array(same)


class OnlineHistoryLookup:
    """The serving engine's history lookup: a user's latest history from the online store.

    `lookup(user_id)` returns the history as a list of action dicts (item_id, action, ts,
    surface), oldest first, or [] for an unknown user (cold start).
    """

    def __init__(self, repo_dir: str | Path, env: str = "local"):
        self.repo_dir = Path(repo_dir)
        self.env = env
        self._store = open_store(repo_dir, env)
        self._features = self._store.get_feature_service(FEATURE_SERVICE)

    def lookup_many(self, user_ids: Sequence[int]) -> list[list[dict]]:
        rows = self._store.get_online_features(
            features=self._features, entity_rows=[{"user_id": int(u)} for u in user_ids]
        ).to_dict()
        out = []
        for i in range(len(user_ids)):
            items = rows["hist_item_ids"][i]
            if items is None:
                out.append([])
                continue
            out.append([
                {"item_id": int(it), "action": int(a), "ts": int(t), "surface": int(s)}
                for it, a, t, s in zip(items, rows["hist_actions"][i], rows["hist_ts"][i], rows["hist_surfaces"][i])
            ])
        return out

    def lookup(self, user_id: int) -> list[dict]:
        return self.lookup_many([user_id])[0]

    __call__ = lookup

    def get_histories(self, user_ids: Sequence[int]):
        """The serving engine's `OnlineStore` protocol: one `History` per id (None if unknown)."""
        from .serving.store import History

        return [History.from_actions(h) if h else None for h in self.lookup_many(user_ids)]


def online_store(repo_dir: str | Path, env: str = "local") -> OnlineHistoryLookup:
    """Factory named in a model archive's serving.json: {"factory": "unipinrec.features:online_store"}."""
    return OnlineHistoryLookup(repo_dir, env)
