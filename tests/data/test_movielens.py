"""MovieLens loaders: counts on the shared files, the GroupLens ratings.dat path, errors."""
from __future__ import annotations

import numpy as np
import pytest

from unipinrec import format as fmt
from unipinrec.actions import MOVIELENS
from unipinrec.data import build_examples, load_movielens
from unipinrec.data.movielens import strictly_increasing_ts


def _check_raw(out, meta):
    ev = fmt.read_sharded(out / "events")
    assert ev.schema.equals(fmt.EVENTS_SCHEMA)
    assert meta["has_impressions"] is False and meta["actions"] == list(MOVIELENS.names)
    assert ev.column("request_id").null_count == ev.num_rows == meta["num_events"]
    df = ev.to_pandas()
    assert (np.diff(df["user_id"]) >= 0).all()
    same = np.diff(df["user_id"]) == 0
    assert (np.diff(df["ts"])[same] > 0).all()  # strictly increasing within a user
    items = fmt.read_sharded(out / "items").to_pandas()
    assert df["item_id"].isin(items["item_id"]).all() and items["item_id"].is_unique
    return df, items


def test_movielens_1m_sasrec_counts(ml1m_dir, tmp_path):
    meta = load_movielens("movielens-1m", ml1m_dir, tmp_path / "raw")
    assert (meta["num_events"], meta["num_users"], meta["num_items"]) == (999_611, 6_040, 3_416)
    df, items = _check_raw(tmp_path / "raw", meta)
    assert meta["id_space"] == "sasrec" and meta["ts_unit"].startswith("seq_pos")
    assert df["user_id"].min() == 1 and df["user_id"].max() == 6_040
    assert sorted(items["item_id"]) == list(range(1, 3_417))
    # ts = seq_pos: 0, 1, 2, ... per user
    assert (df["ts"].to_numpy() == df.groupby("user_id").cumcount().to_numpy()).all()
    assert set(df["action"].unique()) == {1, 2, 3, 4, 5}
    first = items.set_index("item_id").loc[1]
    assert first["title"] == "Raiders of the Lost Ark (1981)" and first["category"] == 0  # Action
    ex = build_examples(tmp_path / "raw", tmp_path / "ex", max_history=200, slate_size=10, progress=False)
    assert ex["splits"]["test"] == ex["splits"]["valid"] == 6_040


def test_movielens_100k_counts_and_stars(ml100k_dir, tmp_path):
    meta = load_movielens("movielens-100k", ml100k_dir, tmp_path / "raw")
    assert (meta["num_events"], meta["num_users"], meta["num_items"]) == (100_000, 943, 1_682)
    df, items = _check_raw(tmp_path / "raw", meta)
    # the star histogram of the shared README; action id == stars
    assert np.bincount(df["action"], minlength=6)[1:].tolist() == [6_110, 11_370, 27_145, 34_174, 21_201]
    assert items.set_index("item_id").loc[1, "title"] == "Toy Story (1995)"
    assert df["ts"].min() > 870_000_000  # real unix times (1997-1998)


RATINGS_DAT = """\
2::20::5::978300760
1::10::3::978300760
1::30::4::978300760
1::20::1::978300100
2::10::2::978301000
1::40::5::978302000
"""
MOVIES_DAT = """\
10::Alpha (1990)::Comedy|Drama
20::Beta (1991)::Action
30::Gamma (1992)::Sci-Fi|Thriller
40::Delta (1993)::Western
50::Unrated (1994)::Documentary
"""


def test_grouplens_ratings_dat_is_preferred_and_ties_are_ordered(tmp_path):
    src = tmp_path / "ml"
    src.mkdir()
    (src / "ratings.dat").write_text(RATINGS_DAT)
    (src / "movies.dat").write_text(MOVIES_DAT, encoding="latin-1")
    meta = load_movielens("movielens-1m", src, tmp_path / "raw")
    assert meta["id_space"] == "original" and meta["files"] == ["ratings.dat", "movies.dat"]
    assert (meta["num_events"], meta["num_users"], meta["num_items"]) == (6, 2, 5)
    df, items = _check_raw(tmp_path / "raw", meta)
    rows = list(df[["user_id", "item_id", "action", "ts"]].itertuples(index=False, name=None))
    assert rows == [
        (1, 20, 1, 978300100),
        (1, 10, 3, 978300760),  # tie at 978300760: ordered by item id, the second moved 1 s later
        (1, 30, 4, 978300761),
        (1, 40, 5, 978302000),
        (2, 20, 5, 978300760),
        (2, 10, 2, 978301000),
    ]
    cats = dict(zip(items["item_id"], items["category"]))
    assert cats == {10: 4, 20: 0, 30: 14, 40: 17, 50: 6}  # first genre, ML-1M genre order


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ratings.dat.*ml-1m_sasrec_with_original_ids_and_ratings.csv.gz"):
        load_movielens("movielens-1m", tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="u.data"):
        load_movielens("movielens-100k", tmp_path, tmp_path / "out")
    (tmp_path / "ratings.dat").write_text(RATINGS_DAT)
    with pytest.raises(FileNotFoundError, match="movies.dat"):
        load_movielens("movielens-1m", tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_movielens("movielens-1m", tmp_path / "absent", tmp_path / "out")
    with pytest.raises(ValueError, match="movielens-20m"):
        load_movielens("movielens-20m", tmp_path, tmp_path / "out")


def test_bad_rating_and_unknown_movie_name_the_field(tmp_path):
    (tmp_path / "movies.dat").write_text(MOVIES_DAT)
    (tmp_path / "ratings.dat").write_text("1::10::7::5\n")
    with pytest.raises(fmt.FormatError, match="rating"):
        load_movielens("movielens-1m", tmp_path, tmp_path / "out")
    (tmp_path / "ratings.dat").write_text("1::99::3::5\n")
    with pytest.raises(fmt.FormatError, match="MovieID.*99"):
        load_movielens("movielens-1m", tmp_path, tmp_path / "out")


def test_strictly_increasing_ts():
    user = np.array([1, 1, 1, 1, 2, 2, 3])
    ts = np.array([5, 5, 5, 9, 5, 5, 0])
    assert strictly_increasing_ts(user, ts).tolist() == [5, 6, 7, 9, 5, 6, 0]
    assert strictly_increasing_ts(np.array([1, 1, 1]), np.array([1, 1, 2])).tolist() == [1, 2, 3]
