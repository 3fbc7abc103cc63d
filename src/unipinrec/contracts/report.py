"""The result of validating one table against a contract: text for people, JSON and HTML files.

The HTML page is standalone (inline CSS, no scripts, nothing fetched), so it can be opened from
disk or shown as a Kubeflow `Output[HTML]` artifact.
"""
from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAX_EXAMPLES = 5


@dataclass
class ExpectationResult:
    rule: str                   # short rule name (suites.py), e.g. "history_before_request"
    name: str                   # GX expectation type, e.g. "expect_column_pair_values_a_to_be_greater_than_b"
    column: str | None          # column(s) it reads, comma-joined; None for table rules
    description: str
    protects: str = ""
    success: bool = True
    skipped: str | None = None  # why it did not run (e.g. no items table)
    error: str | None = None    # GX raised while evaluating it (counts as a failure)
    element_count: int = 0
    unexpected_count: int = 0
    observed_value: object = None
    examples: list = field(default_factory=list)      # a few offending values
    example_rows: list = field(default_factory=list)  # identifying columns of a few offending rows

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else ("pass" if self.success else "FAIL")


@dataclass
class ValidationReport:
    contract: str
    path: str
    suite: str
    success: bool
    results: list[ExpectationResult]
    rows_total: int
    rows_validated: int
    chunks: int = 1
    notes: list[str] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)
    items_path: str | None = None
    seconds: float = 0.0
    gx_version: str = ""
    gx_results: list = field(default_factory=list)  # raw GX validation results (JSON dicts), per chunk

    @property
    def failed(self) -> list[ExpectationResult]:
        return [r for r in self.results if not r.skipped and not r.success]

    def result(self, rule: str) -> ExpectationResult:
        for r in self.results:
            if r.rule == rule:
                return r
        raise KeyError(f"no rule '{rule}' in the {self.contract} contract")

    # ----------------------------------------------------------------------------------- text
    def render_text(self) -> str:
        ran = [r for r in self.results if not r.skipped]
        head = "PASSED" if self.success else "FAILED"
        lines = [
            f"contract '{self.contract}' on {self.path}: {head}",
            f"  rows: {self.rows_validated:,} validated of {self.rows_total:,}"
            + (f" in {self.chunks} chunks" if self.chunks > 1 else "") + f"; {self.seconds:.1f} s",
            f"  expectations: {len(ran) - len(self.failed)} passed, {len(self.failed)} failed"
            + (f", {len(self.results) - len(ran)} skipped" if len(ran) < len(self.results) else ""),
        ]
        lines += [f"  note: {n}" for n in self.notes]
        for r in self.failed:
            where = f" on {r.column}" if r.column else ""
            lines.append(f"  FAIL {r.rule} ({r.name}{where})")
            lines.append(f"       {r.description}")
            if r.error:
                lines.append(f"       error: {r.error}")
            elif r.unexpected_count:
                pct = 100.0 * r.unexpected_count / max(r.element_count, 1)
                lines.append(f"       {r.unexpected_count:,} of {r.element_count:,} rows ({pct:.2f}%)")
            elif r.observed_value is not None:
                lines.append(f"       observed: {_short(r.observed_value)}")
            if r.examples:
                lines.append(f"       offending values: {_short(r.examples)}")
            if r.example_rows:
                lines.append(f"       e.g. rows: {_short(r.example_rows)}")
        for r in self.results:
            if r.skipped:
                lines.append(f"  skip {r.rule}: {r.skipped}")
        return "\n".join(lines)

    # ----------------------------------------------------------------------------------- files
    def to_dict(self, *, include_gx: bool = False) -> dict:
        d = asdict(self)
        if not include_gx:
            d.pop("gx_results")
        d["failed_rules"] = [r.rule for r in self.failed]
        return d

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write `<contract>_validation.json` (this report), `<contract>_gx_results.json` (GX's own
        results) and `<contract>_validation.html`; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": out / f"{self.contract}_validation.json",
            "gx_json": out / f"{self.contract}_gx_results.json",
            "html": out / f"{self.contract}_validation.html",
        }
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        paths["gx_json"].write_text(json.dumps(self.gx_results, indent=2, default=str) + "\n")
        paths["html"].write_text(self.render_html())
        return paths

    def render_html(self) -> str:
        e = html.escape
        status = "PASSED" if self.success else "FAILED"
        rows = []
        order = {"FAIL": 0, "skipped": 1, "pass": 2}  # failures first: the reader came for them
        for r in sorted(self.results, key=lambda r: order[r.status]):
            detail = r.skipped or r.error or ""
            if not detail and r.observed_value is not None and not r.success:
                detail = f"observed: {_short(r.observed_value)}"
            count = "" if r.skipped else (f"{r.unexpected_count:,} / {r.element_count:,}" if r.element_count else "")
            rows.append(
                f"<tr class='{r.status.lower()}'><td>{e(r.status)}</td><td><b>{e(r.rule)}</b><br>"
                f"<code>{e(r.name)}</code></td><td><code>{e(r.column or '')}</code></td>"
                f"<td>{e(r.description)}<div class='why'>{e(r.protects)}</div></td><td class='num'>{e(count)}</td>"
                f"<td><code>{e(_short(r.examples)) if r.examples else ''}</code>"
                f"{'<br><code>' + e(_short(r.example_rows)) + '</code>' if r.example_rows else ''}"
                f"<div class='why'>{e(detail)}</div></td></tr>"
            )
        notes = "".join(f"<li>{e(n)}</li>" for n in self.notes)
        params = e(json.dumps(self.parameters, default=str))
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(self.contract)} contract: {status}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
h1 span.pass {{ color: #1a7f37; }} h1 span.fail {{ color: #cf222e; }}
table {{ border-collapse: collapse; width: 100%; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f0f0f0; }} td.num {{ text-align: right; white-space: nowrap; }}
tr.fail td:first-child {{ background: #ffebe9; color: #cf222e; font-weight: bold; }}
tr.pass td:first-child {{ background: #dafbe1; color: #1a7f37; }}
tr.skipped td:first-child {{ background: #fff8c5; }}
.why {{ color: #666; font-size: 0.9em; }} code {{ word-break: break-all; }}
</style></head><body>
<h1>Data contract <code>{e(self.contract)}</code>: <span class="{'pass' if self.success else 'fail'}">{status}</span></h1>
<p>Data: <code>{e(self.path)}</code><br>Items table: <code>{e(self.items_path or 'none')}</code><br>
Rows validated: {self.rows_validated:,} of {self.rows_total:,} (in {self.chunks} chunk(s)); {self.seconds:.1f} s;
suite <code>{e(self.suite)}</code>, Great Expectations {e(self.gx_version)}<br>
Expectations: {len(self.results) - len(self.failed) - sum(1 for r in self.results if r.skipped)} passed,
{len(self.failed)} failed, {sum(1 for r in self.results if r.skipped)} skipped.<br>Parameters: <code>{params}</code></p>
{'<ul>' + notes + '</ul>' if notes else ''}
<table><tr><th>status</th><th>rule / expectation</th><th>column</th><th>checks (and protects against)</th>
<th>unexpected / rows</th><th>offending values, rows</th></tr>
{''.join(rows)}
</table></body></html>
"""


def _short(value, limit: int = 300) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."
