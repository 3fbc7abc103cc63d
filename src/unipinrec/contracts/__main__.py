"""`python -m unipinrec.contracts export [DIR]`: regenerate data_contracts/ from the code.

Writes the three GX suites (<contract>.json, in GX's own JSON form: `suite.to_json_dict()`)
and the JSON Schemas of the unified format. A test keeps the committed files equal to this output.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .schema_export import FILES, json_schema
from .suites import CONTRACTS, suite_dict


def suite_json(contract: str) -> dict:
    """The suite after a GX round trip, so the file is exactly what GX writes and reads."""
    from .gx_runner import load_suite

    return load_suite(suite_dict(contract)).to_json_dict()


def dump(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def export(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for c in CONTRACTS:
        p = out / f"{c}.json"
        p.write_text(dump(suite_json(c)))
        written.append(p)
        p = out / FILES[c]
        p.write_text(dump(json_schema(c)))
        written.append(p)
    return written


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "export" or len(argv) > 2:
        print("usage: python -m unipinrec.contracts export [DIR]   (default DIR: data_contracts)", file=sys.stderr)
        return 2
    for p in export(argv[1] if len(argv) == 2 else "data_contracts"):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
