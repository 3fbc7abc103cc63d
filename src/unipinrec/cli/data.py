"""CLI commands: `data generate | load | validate` and `examples build | stats`.

Thin glue over unipinrec.data; validate lives in cli/contracts.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .common import fail, user_errors

data_app = typer.Typer(help="Raw datasets: generate synthetic data, load MovieLens, validate contracts.",
                       no_args_is_help=True)
examples_app = typer.Typer(help="Unified examples: build them from a raw dataset, summarise them.",
                           no_args_is_help=True)


def _positive(option: str, value: Optional[int | float], allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        fail(f"{option} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


def _out_dir(option: str, path: Path) -> Path:
    if path.exists() and not path.is_dir():
        fail(f"{option}: {path} exists and is not a folder")
    return path


_OPTION_OF = {"num_users": "--users", "num_items": "--items", "num_requests_per_user": "--requests-per-user",
              "slate_size": "--slate-size", "num_topics": "--topics", "organic_rate": "--organic-rate",
              "chunk_users": "--chunk-users"}


@data_app.command("generate")
def generate(
    out: Path = typer.Option(..., "--out", help="RAW dataset folder to write (meta.json, events/, items/, oracle/)."),
    users: Optional[int] = typer.Option(None, "--users", help="Number of users (default 2000)."),
    items: Optional[int] = typer.Option(None, "--items", help="Number of items (default 1000, or events/1000 with --events)."),
    requests_per_user: int = typer.Option(20, "--requests-per-user", help="Mean feed requests per user (>= 3)."),
    slate_size: int = typer.Option(10, "--slate-size", help="Items shown per feed request."),
    seed: int = typer.Option(42, "--seed", help="Random seed; the same seed gives the same data."),
    events: Optional[int] = typer.Option(None, "--events", help="Size the dataset to about N events (sets --users)."),
    topics: int = typer.Option(0, "--topics", help="Number of item topics (0: items/25 clipped to [4, 50])."),
    organic_rate: float = typer.Option(0.5, "--organic-rate", help="Mean organic (non-feed) actions between requests."),
    chunk_users: int = typer.Option(2000, "--chunk-users", help="Users generated at a time (bounds memory)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Generate the synthetic dataset: drifting user interests, Zipf items, position-biased slates,
    engagement drawn from a known utility (oracle kept in RAW/oracle)."""
    from ..data.synthetic import SyntheticConfig, generate_synthetic, size_for_events

    for option, value in (("--users", users), ("--items", items), ("--slate-size", slate_size),
                          ("--events", events), ("--chunk-users", chunk_users)):
        _positive(option, value)
    _positive("--topics", topics, allow_zero=True)
    _positive("--organic-rate", organic_rate, allow_zero=True)
    if requests_per_user < 3:
        fail(f"--requests-per-user must be at least 3 (train, valid and test requests), got {requests_per_user}")
    if events is not None and users is not None:
        fail("--events and --users both set the number of users; give one of them")
    if items is not None and slate_size > items:
        fail(f"--slate-size ({slate_size}) cannot exceed --items ({items})")
    kwargs: dict[str, Any] = dict(num_requests_per_user=requests_per_user, slate_size=slate_size, seed=seed, num_topics=topics,
                  organic_rate=organic_rate, chunk_users=chunk_users)
    if items is not None:
        kwargs["num_items"] = items
    try:
        cfg = size_for_events(events, **kwargs) if events else SyntheticConfig(num_users=users or 2000, **kwargs)
        cfg.validate()
    except ValueError as e:  # name the option, not the config field
        msg = str(e)
        for field, option in _OPTION_OF.items():
            msg = msg.replace(field, option)
        fail(msg)
    with user_errors(ValueError):
        meta = generate_synthetic(_out_dir("--out", out), cfg, progress=progress)
    typer.echo(f"wrote {out}: {meta['num_events']:,} events ({meta['num_impressions']:,} impressions in "
               f"{meta['num_requests']:,} requests), {meta['num_users']:,} users, {meta['num_items']:,} items, "
               f"engagement rate {meta['engagement_rate']:.1%}")


@data_app.command("load")
def load(
    source: str = typer.Option(..., "--source", help="movielens-1m, movielens-100k, or events (your own export)."),
    path: Path = typer.Option(..., "--path", help="Folder with the MovieLens files (ratings.dat or the SASRec "
                                                  "csv for 1M; u.data and u.item for 100K), or with your events "
                                                  "(events/*.csv|parquet or events.csv|parquet, items.csv|parquet)."),
    out: Path = typer.Option(..., "--out", help="RAW dataset folder to write."),
    mapping: Optional[Path] = typer.Option(None, "--mapping", help="events: column mapping YAML (default: "
                                           "PATH/mapping.yaml when it exists; docs/data.md)."),
    config: Optional[Path] = typer.Option(None, "--config", help="events: experiment config whose data.source "
                                          "names the action vocabulary and whose tasks are checked (default: built-in)."),
    user: Optional[str] = typer.Option(None, "--user", help="events: user id column (over the mapping file)."),
    item: Optional[str] = typer.Option(None, "--item", help="events: item id column."),
    action: Optional[str] = typer.Option(None, "--action", help="events: action column."),
    ts: Optional[str] = typer.Option(None, "--ts", help="events: time column (seconds, or a timestamp)."),
    request_id: Optional[str] = typer.Option(None, "--request-id", help="events: feed request column (impressions)."),
    position: Optional[str] = typer.Option(None, "--position", help="events: slate position column."),
    surface: Optional[str] = typer.Option(None, "--surface", help="events: surface column."),
) -> None:
    """Load MovieLens (action = star rating, no impressions) or your own events into the RAW layout."""
    from ..data.movielens import SOURCES, load_movielens

    if source not in (*SOURCES, "events"):
        fail(f"--source must be one of {', '.join(SOURCES)}, events; got '{source}'")
    if not path.is_dir():
        fail(f"--path: folder {path} not found")
    if source == "events":
        columns = dict(user=user, item=item, action=action, ts=ts, request_id=request_id, position=position,
                       surface=surface)
        return _load_events(path, _out_dir("--out", out), mapping, config, columns)
    with user_errors(ValueError):
        meta = load_movielens(source, path, _out_dir("--out", out))
    typer.echo(f"wrote {out}: {meta['num_events']:,} ratings, {meta['num_users']:,} users, "
               f"{meta['num_items']:,} items ({', '.join(meta['files'])}; ts = {meta['ts_unit']})")


def _load_events(path: Path, out: Path, mapping: Optional[Path], config: Optional[Path], columns: dict) -> None:
    from ..actions import vocab_for
    from ..config import ExperimentConfig, load_config
    from ..data.events import load_events, load_mapping

    if mapping is None and (path / "mapping.yaml").exists():
        mapping = path / "mapping.yaml"
    with user_errors(ValueError, FileExistsError):
        cfg = load_config(config) if config else ExperimentConfig()
        vocab = vocab_for(cfg.data.source)
        meta = load_events(path, out, vocab=vocab, vocab_source=cfg.data.source,
                           mapping=load_mapping(mapping, **columns), tasks=cfg.tasks)
    typer.echo(f"wrote {out}: {meta['num_events']:,} events ({meta['num_requests']:,} feed requests), "
               f"{meta['num_users']:,} users, {meta['num_items']:,} items ({', '.join(meta['files'])}, "
               f"{meta['items_file']}; actions of '{cfg.data.source}'; events contract passed)")


@examples_app.command("build")
def build(
    raw: Path = typer.Option(..., "--raw", help="RAW dataset folder (from `data generate` or `data load`)."),
    out: Path = typer.Option(..., "--out", help="Examples folder to write (meta.json, train/, valid/, test/, items/)."),
    max_history: int = typer.Option(50, "--max-history", help="L: the last L actions before the request are kept."),
    slate_size: Optional[int] = typer.Option(None, "--slate-size", help="S: next-action slate length without "
                                             "impressions; with impressions, positions < S (default: the whole slate, or 10)."),
    chunk_events: int = typer.Option(500_000, "--chunk-events", help="Events per streamed chunk (bounds memory)."),
    history_impressions: bool = typer.Option(False, "--history-impressions/--no-history-impressions",
                                             help="Keep earlier impressions (shown, not engaged) in the history."),
    layout: str = typer.Option("examples", "--layout", help="examples: one UnifiedExample per row; sequences: each "
                               "user's actions stored once (bucketed by user hash) + request rows, histories cut "
                               "when read (docs/data.md)."),
    buckets: int = typer.Option(16, "--buckets", help="sequences layout: number of user-hash buckets."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Build UnifiedExamples (history + slate per request) with train/valid/test splits."""
    from ..data.examples import build_examples

    if not (raw / "meta.json").exists():
        fail(f"--raw: {raw} is not a RAW dataset folder (no meta.json)")
    if out.resolve() == raw.resolve():
        fail(f"--out must differ from --raw ({raw})")
    _positive("--max-history", max_history)
    _positive("--slate-size", slate_size)
    _positive("--chunk-events", chunk_events)
    _positive("--buckets", buckets)
    if layout not in ("examples", "sequences"):
        fail(f"--layout must be examples or sequences, got '{layout}'")
    with user_errors(ValueError):
        meta = build_examples(raw, _out_dir("--out", out), max_history=max_history, slate_size=slate_size,
                              chunk_events=chunk_events, progress=progress, history_impressions=history_impressions,
                              layout=layout, buckets=buckets)
    s = meta["splits"]
    where = f"; {meta['sequence_rows']:,} sequence rows in {buckets} buckets" if layout == "sequences" else ""
    typer.echo(f"wrote {out}: train {s['train']:,}, valid {s['valid']:,}, test {s['test']:,} examples "
               f"(L={meta['max_history']}, S={meta['slate_size']}{where})")


@examples_app.command("stats")
def stats(
    examples_dir: Path = typer.Argument(..., help="Examples folder (from `examples build`)."),
    positive: Optional[list[str]] = typer.Option(None, "--positive", help="Action counted as positive (repeatable) "
                                                 "(default: click, save, share; MovieLens: rating_4, rating_5)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Split counts, history length distribution, slate sizes, action mix and positives rate."""
    from ..data.stats import examples_stats, format_stats

    if not (examples_dir / "meta.json").exists():
        fail(f"EXAMPLES_DIR: {examples_dir} is not an examples folder (no meta.json)")
    with user_errors(ValueError):
        result = examples_stats(examples_dir, tuple(positive) if positive else None)
    typer.echo(json.dumps(result, indent=2) if as_json else format_stats(result))


def register(app: typer.Typer) -> None:
    from . import contracts

    contracts.register(data_app)
    app.add_typer(data_app, name="data")
    app.add_typer(examples_app, name="examples")
