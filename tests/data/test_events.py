"""`data load --source events`: the worked example (CSV, and a Parquet export of it), and one-line
errors for malformed inputs that write nothing."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from unipinrec import format as fmt
from unipinrec import steps
from unipinrec.actions import SYNTHETIC
from unipinrec.cli import app
from unipinrec.data.events import EventsMapping, load_mapping, read_events

EXAMPLE = Path(__file__).parent / "events_example"
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_worked_example_csv(tmp_path):
    r = run("data", "load", "--source", "events", "--path", EXAMPLE, "--out", tmp_path / "raw")
    assert r.exit_code == 0, r.output
    assert "48 events (13 feed requests), 4 users, 12 items" in r.output
    meta = fmt.read_meta(tmp_path / "raw")
    assert meta["source"] == "synthetic" and meta["loaded_from"] == "events" and meta["has_impressions"]
    assert meta["actions"] == list(SYNTHETIC.names)
    ev = fmt.read_sharded(tmp_path / "raw" / "events")
    user, ts = ev.column("user_id").to_numpy(), ev.column("ts").to_numpy()
    assert np.all(np.diff(user) >= 0) and np.all((np.diff(ts) >= 0) | (np.diff(user) > 0))  # sorted by (user, ts)
    assert sorted(set(user)) == [7, 11, 23, 42]
    # the export's first row: "7,109,clicked,2026-03-02 21:04:00,,,search"
    row = [e for e in ev.to_pylist() if e["item_id"] == 109 and e["ts"] == 1772485440][0]
    assert row == {"user_id": 7, "item_id": 109, "action": SYNTHETIC.id("click"), "ts": 1772485440, "surface": 1,
                   "request_id": None, "position": None}
    assert ev.filter(ev.column("request_id").is_valid()).num_rows == 39  # 13 requests x 3 slots
    items = fmt.read_sharded(tmp_path / "raw" / "items")
    assert items.num_rows == 12 and items.column("category").to_pylist()[:4] == [0, 1, 2, 3]
    # the rest of the pipeline reads it: examples build, data validate
    r = run("examples", "build", "--raw", tmp_path / "raw", "--out", tmp_path / "ex", "--max-history", 4,
            "--no-progress")
    assert r.exit_code == 0, r.output
    assert fmt.read_meta(tmp_path / "ex")["splits"] == {"train": 5, "valid": 4, "test": 4}
    test = fmt.read_sharded(tmp_path / "ex" / "test")
    assert all(len(s) == 3 for s in test.column("slate").to_pylist())
    r = run("data", "validate", tmp_path / "raw", "--contract", "events", "--out", tmp_path / "val", "--no-progress")
    assert r.exit_code == 0, r.output


def _parquet_export(dst: Path) -> None:
    """The worked example as a warehouse would export it to Parquet: native timestamp type, ids
    as int64, a folder of part files, and other column names (given by flags)."""
    t = pcsv.read_csv(EXAMPLE / "events.csv")
    t = t.rename_columns(["uid", "pin", "event", "event_time", "req", "slot", "surface_name"])
    t = t.set_column(3, "event_time", t.column("event_time").cast(pa.timestamp("ms")))
    (dst / "events").mkdir(parents=True)
    pq.write_table(t.slice(0, 20), dst / "events" / "part-0.parquet")
    pq.write_table(t.slice(20), dst / "events" / "part-1.parquet")
    pq.write_table(pcsv.read_csv(EXAMPLE / "items.csv"), dst / "items.parquet")
    mapping = (EXAMPLE / "mapping.yaml").read_text().split("actions:")[1]
    (dst / "map.yaml").write_text("items: {item: pin_id, category: topic_id}\nactions:" + mapping)


def test_parquet_export_with_flags_equals_csv(tmp_path):
    _parquet_export(tmp_path / "export")
    r = run("data", "load", "--source", "events", "--path", tmp_path / "export", "--out", tmp_path / "raw",
            "--mapping", tmp_path / "export" / "map.yaml", "--user", "uid", "--item", "pin", "--action", "event",
            "--ts", "event_time", "--request-id", "req", "--position", "slot", "--surface", "surface_name")
    assert r.exit_code == 0, r.output
    assert fmt.read_meta(tmp_path / "raw")["files"] == ["events/part-0.parquet", "events/part-1.parquet"]
    csv_events, _, _ = read_events(EXAMPLE, load_mapping(EXAMPLE / "mapping.yaml"), SYNTHETIC)
    assert fmt.read_sharded(tmp_path / "raw" / "events").equals(csv_events)


def test_pipeline_ingest_step(tmp_path):
    meta = steps.ingest(tmp_path / "raw", source="events", data_path=str(EXAMPLE),
                        config_yaml=(Path(__file__).parents[2] / "configs" / "synthetic.yaml").read_text())
    assert meta["num_events"] == 48 and fmt.count_rows(tmp_path / "raw" / "events") == 48


def test_vocabulary_and_tasks_come_from_the_config(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data: {source: movielens-1m}\ntasks: {positive_actions: [rating_5], tasks: {liked: [rating_5]}, "
                   "score_weights: {liked: 1.0}}\n")
    r = run("data", "load", "--source", "events", "--path", EXAMPLE, "--out", tmp_path / "raw", "--config", cfg)
    assert r.exit_code == 1
    assert "mapping actions.clicked: 'click' is not an action of the vocabulary ['impression', 'rating_1'" in r.output
    cfg.write_text("tasks: {positive_actions: [click], tasks: {liked: [rating_5]}, score_weights: {liked: 1.0}}\n")
    r = run("data", "load", "--source", "events", "--path", EXAMPLE, "--out", tmp_path / "raw", "--config", cfg)
    assert r.exit_code == 1 and "config tasks.liked: 'rating_5' is not an action" in r.output
    assert not (tmp_path / "raw").exists()


def _edit_events(src: Path, dst: Path, edit) -> None:
    shutil.copytree(src, dst)
    lines = (dst / "events.csv").read_text().splitlines()
    (dst / "events.csv").write_text("\n".join(edit(lines)) + "\n")


def _replace(line: int, old: str, new: str):
    def edit(lines):
        lines[line] = lines[line].replace(old, new, 1)
        return lines
    return edit


# (name, edit of events.csv lines (0 = header), words the one-line error must hold)
MALFORMED = [
    ("missing column", lambda ls: [",".join(c for c in l.split(",")[:3] + l.split(",")[4:]) for l in ls],
     ["events.csv", "column 'event_time' (ts) not found"]),
    ("wrong type", _replace(3, "7,102,", "7,p102,"), ["events.csv", "column 'pin_id' (item)", "integers", "'p102'",
                                                       "data rows 3"]),
    ("null user", _replace(2, "11,", ",", ), ["events.csv", "column 'visitor_id' (user)", "1 null values",
                                              "data rows 2"]),
    ("unknown action name", _replace(5, "clicked", "liked"), ["events.csv", "column 'event_type' (action)", "'liked'",
                                                               "neither actions of the vocabulary"]),
    ("non-numeric ts", _replace(1, "2026-03-02 21:04:00", "yesterday"), ["events.csv", "column 'event_time' (ts)",
                                                                          "not numeric", "'yesterday'"]),
    ("duplicate event", lambda ls: ls + [ls[7]], ["events.csv", "1 duplicate events", "user 11, item 106"]),
    ("item not in the items file", _replace(1, "7,109,", "7,999,"), ["events.csv", "column 'pin_id' (item)",
                                                                     "missing from items.csv", "999"]),
    ("empty file", lambda ls: ls[:1], ["events.csv", "no event rows"]),
]


@pytest.mark.parametrize("name,edit,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_is_one_line_error_and_writes_nothing(tmp_path, name, edit, words):
    _edit_events(EXAMPLE, tmp_path / "export", edit)
    out = tmp_path / "out" / "raw"
    out.parent.mkdir()
    r = run("data", "load", "--source", "events", "--path", tmp_path / "export", "--out", out)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists() and not list((tmp_path / "out").iterdir())  # no temp folder left either


def test_failed_load_keeps_the_old_raw_folder(tmp_path):
    out = tmp_path / "raw"
    assert run("data", "load", "--source", "events", "--path", EXAMPLE, "--out", out).exit_code == 0
    before = fmt.read_sharded(out / "events")
    _edit_events(EXAMPLE, tmp_path / "export", _replace(5, "clicked", "liked"))
    assert run("data", "load", "--source", "events", "--path", tmp_path / "export", "--out", out).exit_code == 1
    assert fmt.read_sharded(out / "events").equals(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "raw"]


def test_mapping_errors_name_the_field(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("events: {usr: visitor_id}\n")
    with pytest.raises(ValueError, match=r"mapping.events.usr: unknown field"):
        load_mapping(bad)
    bad.write_text("actions: {viewed: seen}\n")
    with pytest.raises(fmt.FormatError, match="mapping actions.viewed: 'seen' is not an action"):
        read_events(EXAMPLE, load_mapping(bad), SYNTHETIC)
    assert load_mapping(None, user="u").events.user == "u" and EventsMapping().ts_unit == "s"


def test_synthetic_events_round_trip_through_a_csv_export(tmp_path):
    """RAW events written out as a warehouse CSV (action names, shuffled rows) load back equal."""
    from unipinrec.data import generate_synthetic

    generate_synthetic(tmp_path / "raw", num_users=30, num_items=80, num_requests_per_user=5, slate_size=4,
                       seed=2, progress=False)
    ev = fmt.read_sharded(tmp_path / "raw" / "events")
    names = pa.array(list(SYNTHETIC.names))
    export = ev.set_column(2, "action", names.take(ev.column("action").cast(pa.int32())))
    export = export.take(np.random.default_rng(0).permutation(export.num_rows))
    (tmp_path / "export").mkdir()
    pcsv.write_csv(export, tmp_path / "export" / "events.csv")
    pcsv.write_csv(fmt.read_sharded(tmp_path / "raw" / "items"), tmp_path / "export" / "items.csv")
    events, items, info = read_events(tmp_path / "export", EventsMapping(), SYNTHETIC)
    assert events.equals(ev) and info["num_requests"] == int(pa.compute.count_distinct(ev.column("request_id")).as_py())
    assert items.equals(fmt.read_sharded(tmp_path / "raw" / "items").select(fmt.ITEMS_SCHEMA.names))


def test_user_ranges_give_the_same_events_and_checks_span_files(tmp_path):
    """Spilled into user-id ranges of a few events each, the export loads to the same table; a
    duplicate across two part files is found and named by the file that repeats it."""
    mapping = load_mapping(EXAMPLE / "mapping.yaml")
    whole, _, info = read_events(EXAMPLE, mapping, SYNTHETIC)
    ranged, _, info_ranged = read_events(EXAMPLE, mapping, SYNTHETIC, partition_rows=7)
    assert info["partitions"] == 1 and info_ranged["partitions"] == 7 and ranged.equals(whole)
    assert {k: info_ranged[k] for k in ("num_events", "num_users", "num_requests")} == \
        {"num_events": 48, "num_users": 4, "num_requests": 13}
    lines = (EXAMPLE / "events.csv").read_text().splitlines()
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "a.csv").write_text("\n".join(lines[:30]) + "\n")
    (tmp_path / "events" / "b.csv").write_text("\n".join(lines[:1] + lines[30:] + [lines[12]]) + "\n")
    shutil.copy(EXAMPLE / "items.csv", tmp_path / "items.csv")
    with pytest.raises(fmt.FormatError, match=r"^events/b.csv: 1 duplicate events"):
        read_events(tmp_path, mapping, SYNTHETIC, partition_rows=5)


# more checks, through the library: (edit of events.csv lines, regex of the error)
MORE = [
    (_replace(2, "9005,1,", "9005,,"), r"events.csv: column 'slot' is null on rows where .* data rows 2"),
    (_replace(2, "2026-03-03 06:51:00", "2026-03-03 06:52:00"), r"events.csv: request_id 9005 has rows of different"),
    (_replace(2, ",home_feed", ",app"), r"column 'surface_name' \(surface\) has values that are not surface names .*'app'"),
    (_replace(2, "9005,1,", "9005,-1,"), r"column 'slot' \(position\) must be in 0..32767; found -1"),
]


@pytest.mark.parametrize("edit,message", MORE)
def test_feed_rows_and_values_are_checked(tmp_path, edit, message):
    _edit_events(EXAMPLE, tmp_path / "export", edit)
    with pytest.raises(fmt.FormatError, match=message):
        read_events(tmp_path / "export", load_mapping(EXAMPLE / "mapping.yaml"), SYNTHETIC)


def test_numeric_ts_in_milliseconds_and_integer_action_ids(tmp_path):
    (tmp_path / "events.csv").write_text("user_id,item_id,action,ts\n1,100,1,1700000000123\n1,101,2,1700000005999\n")
    (tmp_path / "items.csv").write_text("item_id\n100\n101\n")
    events, items, info = read_events(tmp_path, EventsMapping(ts_unit="ms"), SYNTHETIC)
    assert events.column("ts").to_pylist() == [1700000000, 1700000005]
    assert events.column("action").to_pylist() == [1, 2] and not info["num_requests"]
    assert items.column("category").to_pylist() == [0, 0]
    (tmp_path / "events.csv").write_text("user_id,item_id,action,ts\n1,100,7,1700000000\n")
    with pytest.raises(fmt.FormatError, match=r"column 'action' \(action\) must be in 0..4; found 7"):
        read_events(tmp_path, EventsMapping(), SYNTHETIC)
