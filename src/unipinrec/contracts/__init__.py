"""Data contracts: Great Expectations 1.x suites for raw events, items and unified examples.

    from unipinrec.contracts import validate
    report = validate("runs/raw/events", "events")   # items/ and meta.json found beside it
    print(report.render_text()); report.write("runs/validation")

Importing this package does not import great_expectations (about 5 s); `validate` does, once.
The suites are defined in suites.py and exported as JSON to data_contracts/ (see its README).
"""
from __future__ import annotations

from .report import ExpectationResult, ValidationReport
from .suites import CONTRACTS, Rule, rules_for, suite_dict
from .validate import validate

__all__ = ["CONTRACTS", "ExpectationResult", "Rule", "ValidationReport", "rules_for", "suite_dict", "validate"]
