"""Writing a benchmark's table as JSON and CSV (beside the printed table)."""

import csv
import json
import os


def save_table(name: str, headers: list, rows: list, meta: dict, out: str | None = None) -> None:
    """``{out}/{name}.json`` (meta + rows as dicts) and ``{out}/{name}.csv``; out defaults to $OUT or '.'."""
    out = out or os.environ.get("OUT") or "."
    os.makedirs(out, exist_ok=True)
    records = [dict(zip(headers, row)) for row in rows]
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({**meta, "rows": records}, f, indent=1)
    with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(headers)
        w.writerows(rows)
