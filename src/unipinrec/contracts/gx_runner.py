"""Runs a suite with Great Expectations 1.x on pandas chunks and merges the per-chunk results.

This is the only module that imports great_expectations; validate.py imports it lazily.
One ephemeral context (in memory, analytics and progress bars off) is shared per process.
"""
from __future__ import annotations

import uuid
from collections import Counter

import great_expectations as gx
import pandas as pd
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

from ..format import FormatError
from .report import MAX_EXAMPLES, ExpectationResult

_CONTEXT = None
# Columns that identify a row in the report ("e.g. rows"), per contract.
ROW_IDS = {"events": ["user_id", "ts"], "items": ["item_id"], "examples": ["user_id", "request_ts"]}


def context():
    """The process-wide ephemeral GX context (created on first use)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = gx.get_context(
            mode="ephemeral",
            project_config=DataContextConfig(
                analytics_enabled=False,
                progress_bars=ProgressBarsConfig(globally=False),
                store_backend_defaults=InMemoryStoreBackendDefaults(),
            ),
        )
    return _CONTEXT


def load_suite(suite_json: dict) -> "gx.ExpectationSuite":
    """A GX suite from its JSON dict (the round trip the data_contracts/ files rely on).

    GX logs and drops expectations of unknown types; a contract that silently lost rules would
    pass too easily, so that is an error here, as is a suite with no expectations.
    """
    name = suite_json.get("name", "?")
    wanted = [e.get("type") for e in suite_json.get("expectations") or []]
    if not wanted:
        raise FormatError(f"suite '{name}' has no expectations")
    suite = gx.ExpectationSuite(**suite_json)
    lost = Counter(wanted) - Counter(e.expectation_type for e in suite.expectations)
    if lost:
        raise FormatError(f"suite '{name}': Great Expectations {gx.__version__} has no expectation type(s) "
                          f"{sorted(lost)}")
    return suite


def _column_of(kwargs: dict) -> str | None:
    for k in ("column", "column_list", "column_A"):
        if k in kwargs:
            v = kwargs[k]
            if k == "column_A":
                return f"{v}, {kwargs.get('column_B')}"
            return ", ".join(v) if isinstance(v, list) else v
    return None


class GXRunner:
    def __init__(self, contract: str, suite_json: dict, params: dict, available: dict, needs: dict):
        self.contract = contract
        self.params = params
        self.gx_version = gx.__version__
        self.chunks = 0
        self.skipped: dict[int, str] = {}
        self.results: list[ExpectationResult] = []
        self.gx_results: list[dict] = []

        ctx = context()
        suite = load_suite(suite_json)  # validates the JSON: unknown types or kwargs raise here
        runnable = []
        for i, exp in enumerate(suite.expectations):
            meta = exp.meta or {}
            kwargs = exp.configuration.kwargs
            self.results.append(ExpectationResult(
                rule=meta.get("rule") or f"{exp.expectation_type}({_column_of(kwargs) or ''})",
                name=exp.expectation_type, column=_column_of(kwargs),
                description=exp.description or "", protects=meta.get("protects", ""),
            ))
            need = meta.get("needs")
            missing_param = [v["$PARAMETER"] for v in kwargs.values()
                             if isinstance(v, dict) and "$PARAMETER" in v and v["$PARAMETER"] not in params]
            if need and not available.get(need, False):
                self.skipped[i] = f"needs {needs.get(need, need)}"
            elif missing_param:
                self.skipped[i] = f"suite parameter(s) {missing_param} unknown for this dataset"
            else:
                runnable.append(i)
        self.runnable = runnable
        for i, reason in self.skipped.items():
            self.results[i].skipped = reason

        tag = f"{contract}_{uuid.uuid4().hex[:8]}"
        configs = []
        for i in runnable:  # GX may evaluate (and return) expectations in its own order: tag them
            cfg = suite.expectations[i].configuration
            cfg.meta = {**(cfg.meta or {}), "_unipinrec_index": i}
            configs.append(cfg)
        self._suite = ctx.suites.add(gx.ExpectationSuite(name=tag, expectations=configs, meta=suite.meta))
        source = ctx.data_sources.add_or_update_pandas("unipinrec")
        self._asset = source.add_dataframe_asset(tag)
        batch_def = self._asset.add_batch_definition_whole_dataframe("all")
        self._vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=tag, data=batch_def, suite=self._suite))
        self._source, self._tag = source, tag

    def run(self, frame: pd.DataFrame) -> None:
        """Validate one chunk and fold its results into the totals."""
        self.chunks += 1
        if not self.runnable:
            return
        ids = [c for c in ROW_IDS[self.contract] if c in frame.columns]
        fmt = {"result_format": "SUMMARY", "partial_unexpected_count": 4 * MAX_EXAMPLES}  # room for distinct ones
        if ids:
            fmt["unexpected_index_column_names"] = ids
        res = self._vd.run(batch_parameters={"dataframe": frame}, expectation_parameters=self.params, result_format=fmt)
        self.gx_results.append(res.to_json_dict())
        for r in res.results:
            self._fold(self.results[int(r.expectation_config.meta["_unipinrec_index"])], r)

    def _fold(self, out: ExpectationResult, r) -> None:
        result = r.result or {}
        err = _exception(r.exception_info)
        if err:
            out.error = out.error or err
        out.success = out.success and bool(r.success) and not err
        out.element_count += int(result.get("element_count") or 0)
        out.unexpected_count += int(result.get("unexpected_count") or 0)
        if "observed_value" in result and (out.observed_value is None or not r.success):
            out.observed_value = result["observed_value"]
        # distinct values: "[9, 9, 9, 9, 9]" says less than "[9, 12]"
        for v in result.get("partial_unexpected_list") or []:
            v = _plain(v)
            if len(out.examples) < MAX_EXAMPLES and v not in out.examples:
                out.examples.append(v)
        for v in result.get("partial_unexpected_index_list") or []:
            v = _plain(v)
            if len(out.example_rows) < MAX_EXAMPLES and v not in out.example_rows:
                out.example_rows.append(v)

    def finish(self) -> tuple[list[ExpectationResult], list[dict], bool]:
        ctx = context()
        # Keep the shared context small: a validation run leaves nothing behind.
        ctx.validation_definitions.delete(self._tag)
        ctx.suites.delete(self._tag)
        self._source.delete_asset(self._tag)
        if self.chunks == 0:
            for i in self.runnable:
                self.results[i].success = False
                self.results[i].error = "no chunk was validated"
        success = all(r.success for r in self.results if not r.skipped)
        return self.results, self.gx_results, success


def _exception(info) -> str | None:
    """GX puts exceptions either directly or keyed by metric; return the first message."""
    if not info:
        return None
    if isinstance(info, dict) and "raised_exception" in info:
        return info.get("exception_message") if info.get("raised_exception") else None
    if isinstance(info, dict):
        for v in info.values():
            msg = _exception(v)
            if msg:
                return msg
    return None


def _plain(v):
    """Offending values as JSON-friendly plain values (GX hands back numpy / pandas scalars)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or v is pd.NA:
        return None
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    v = v.item() if hasattr(v, "item") else v
    return int(v) if isinstance(v, float) and v.is_integer() else v  # derived summaries are float64
