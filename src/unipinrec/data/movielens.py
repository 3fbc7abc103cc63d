"""MovieLens loaders (`movielens-1m`, `movielens-100k`) producing the RAW layout.

The action is the star rating (unipinrec.actions.MOVIELENS: id == stars); MovieLens has no
impressions. Events are sorted by (user_id, ts, item_id); within a user, ties in ts are moved
forward one second at a time, so each user's times are strictly increasing and "history
strictly before request_ts" is well defined (docs/data.md).

movielens-1m reads, in this order of preference:
  1. GroupLens `ratings.dat` (UserID::MovieID::Rating::Timestamp) + `movies.dat`: real
     timestamps, original ids; the item table is every movie in movies.dat (first genre =
     category).
  2. the SASRec files of ../shared/data/movielens-1m
     (`ml-1m_sasrec_with_original_ids_and_ratings.csv.gz`): SASRec ids (users 1..6040, items
     1..3416), ts = seq_pos because absolute times are unknown, so time-gap features carry only
     order. This is the data of the SASRec / HSTU leave-one-out protocol.
movielens-100k reads `u.data` (tab separated, unix timestamps) and `u.item`.

MovieLens may not be redistributed: nothing read here belongs in git.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from .. import format as fmt
from ..actions import MOVIELENS

SOURCES = ("movielens-1m", "movielens-100k")
SASREC_CSV = "ml-1m_sasrec_with_original_ids_and_ratings.csv.gz"
ML1M_GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
               "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
               "Western")


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} not found")
    return path


def _read_dat(path: Path, names: list[str]) -> pd.DataFrame:
    """GroupLens `::`-separated files (ISO-8859-1)."""
    text = path.read_bytes().decode("latin-1").replace("::", "\t")
    return pd.read_csv(io.StringIO(text), sep="\t", header=None, names=names, quoting=3,
                       dtype={n: "string" for n in names if n in ("title", "genres")})


def _ml1m_movies(path: Path) -> pd.DataFrame:
    movies = _read_dat(path, ["movie_id", "title", "genres"])
    first = movies["genres"].fillna("").str.split("|").str[0]
    movies["category"] = first.map({g: i for i, g in enumerate(ML1M_GENRES)}).fillna(len(ML1M_GENRES)).astype("int32")
    return movies


def strictly_increasing_ts(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Per user (rows grouped by user, sorted by ts), move tied times forward so they increase
    strictly: ts'[i] = max(ts[i], ts'[i-1] + 1)."""
    if len(ts) == 0:
        return ts
    new = np.ones(len(user), dtype=bool)
    new[1:] = user[1:] != user[:-1]
    starts = np.flatnonzero(new)
    idx = np.arange(len(ts)) - np.repeat(starts, np.diff(np.append(starts, len(ts))))
    # ts'[i] = i + max_{j <= i in the user} (ts[j] - j); the user offset keeps users apart
    offset = (np.cumsum(new) - 1).astype(np.int64) * (1 << 40)
    span = ts - ts.min()
    if span.max() >= (1 << 39):
        raise fmt.FormatError("field 'ts' spans more than 2**39 seconds")
    return np.maximum.accumulate(offset + span - idx) - offset + idx + ts.min()


def _events(df: pd.DataFrame) -> pa.Table:
    df = df.sort_values(["user_id", "ts", "item_id"], kind="stable")
    user = df["user_id"].to_numpy(np.int64)
    rating = df["rating"].to_numpy()
    bad = ~np.isin(rating, np.arange(1, 6))
    if bad.any():
        raise fmt.FormatError(f"field 'rating' has {int(bad.sum())} values outside 1..5, e.g. {rating[bad][:3].tolist()}")
    n = len(df)
    return pa.table(
        {
            "user_id": user,
            "item_id": df["item_id"].to_numpy(np.int64),
            "action": rating.astype(np.int8),  # MOVIELENS vocabulary: id == stars
            "ts": strictly_increasing_ts(user, df["ts"].to_numpy(np.int64)),
            "surface": np.zeros(n, np.int8),
            "request_id": pa.nulls(n, pa.int64()),
            "position": pa.nulls(n, pa.int16()),
        },
        schema=fmt.EVENTS_SCHEMA,
    )


def _items(item_id, category, title) -> pa.Table:
    return pa.table(
        {"item_id": np.asarray(item_id, np.int64), "category": np.asarray(category, np.int32),
         "title": pa.array(list(title), pa.string())},
        schema=fmt.ITEMS_SCHEMA,
    ).sort_by("item_id")


def _load_ml1m(path: Path) -> tuple[pa.Table, pa.Table, dict]:
    ratings_dat = path / "ratings.dat"
    if ratings_dat.exists():
        df = _read_dat(ratings_dat, ["user_id", "item_id", "rating", "ts"])
        movies = _ml1m_movies(_need(path / "movies.dat", "movielens-1m needs movies.dat beside ratings.dat"))
        unknown = set(df["item_id"].unique()) - set(movies["movie_id"])
        if unknown:
            raise fmt.FormatError(f"ratings.dat: field 'MovieID' has ids missing from movies.dat, e.g. {sorted(unknown)[:3]}")
        items = _items(movies["movie_id"], movies["category"], movies["title"])
        return _events(df), items, {"files": ["ratings.dat", "movies.dat"], "id_space": "original",
                                    "ts_unit": "seconds"}
    csv = path / SASREC_CSV
    if not csv.exists():
        raise FileNotFoundError(f"movielens-1m: neither {ratings_dat} nor {csv} found")
    df = pd.read_csv(csv, usecols=["sas_user_id", "seq_pos", "sas_item_id", "orig_movie_id", "rating"])
    df = df.rename(columns={"sas_user_id": "user_id", "sas_item_id": "item_id", "seq_pos": "ts"})
    catalog = df.drop_duplicates("item_id")[["item_id", "orig_movie_id"]]
    movies_dat = path / "movies.dat"
    if movies_dat.exists():
        movies = _ml1m_movies(movies_dat).set_index("movie_id")
        category = movies["category"].reindex(catalog["orig_movie_id"]).fillna(len(ML1M_GENRES)).to_numpy()
        title = movies["title"].reindex(catalog["orig_movie_id"]).astype(object).where(lambda s: s.notna(), None)
    else:
        category, title = np.full(len(catalog), len(ML1M_GENRES)), [None] * len(catalog)
    items = _items(catalog["item_id"], category, title)
    return _events(df), items, {"files": [SASREC_CSV] + (["movies.dat"] if movies_dat.exists() else []),
                                "id_space": "sasrec", "ts_unit": "seq_pos (absolute times unknown)"}


def _load_ml100k(path: Path) -> tuple[pa.Table, pa.Table, dict]:
    data = _need(path / "u.data", "movielens-100k")
    item_file = _need(path / "u.item", "movielens-100k")
    df = pd.read_csv(data, sep="\t", header=None, names=["user_id", "item_id", "rating", "ts"])
    genres = [f"g{i}" for i in range(19)]
    items = pd.read_csv(item_file, sep="|", header=None, encoding="latin-1", quoting=3,
                        names=["item_id", "title", "release", "video", "url", *genres])
    flags = items[genres].to_numpy()
    category = np.where(flags.any(1), flags.argmax(1), 0)  # first genre flag (0 = unknown)
    unknown = set(df["item_id"].unique()) - set(items["item_id"])
    if unknown:
        raise fmt.FormatError(f"u.data: field 'item id' has ids missing from u.item, e.g. {sorted(unknown)[:3]}")
    return _events(df), _items(items["item_id"], category, items["title"]), {
        "files": ["u.data", "u.item"], "id_space": "original", "ts_unit": "seconds"}


def load_movielens(source: str, path: str | Path, out_dir: str | Path, *, rows_per_shard: int = 1_000_000) -> dict:
    """Read MovieLens files from `path` and write a RAW dataset folder to `out_dir`."""
    if source not in SOURCES:
        raise ValueError(f"source '{source}' is not one of {list(SOURCES)}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{source}: folder {path} not found")
    events, items, info = (_load_ml1m if source == "movielens-1m" else _load_ml100k)(path)
    out = Path(out_dir)
    fmt.write_sharded(out / "events", events, fmt.EVENTS_SCHEMA, rows_per_shard)
    fmt.write_sharded(out / "items", items, fmt.ITEMS_SCHEMA, rows_per_shard)
    if (out / "oracle").exists():  # a folder reused from a synthetic run must not keep its oracle
        shutil.rmtree(out / "oracle")
    users = events.column("user_id").to_numpy()
    meta = {
        "source": source,
        "actions": list(MOVIELENS.names),
        "num_users": int(len(np.unique(users))),
        "num_items": items.num_rows,
        "num_rated_items": int(len(np.unique(events.column("item_id").to_numpy()))),
        "num_events": events.num_rows,
        "has_impressions": False,
        "path": str(path),
        **info,
    }
    fmt.write_meta(out, meta)
    return meta
