"""Writing a benchmark's table: JSON and CSV of this run, and JSON lines appended to the run history.

Every run appends one JSON object per row to ``{out}/{name}.jsonl`` and to
``benchmarks/results/{name}.jsonl`` (the history kept in git): the row as a
dict plus the run's meta, completed with the date, the command and the
versions and device when the script did not give them.
"""

import csv
import datetime
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_info(meta: dict) -> dict:
    """``meta`` plus date (ISO, UTC), command, torch / triton / CUDA versions and device where missing."""
    info = dict(meta)
    info.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    info.setdefault("command", "python " + " ".join(sys.argv))
    try:
        import torch
    except ImportError:
        return info
    info.setdefault("torch", torch.__version__)
    try:
        import triton

        info.setdefault("triton", triton.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info.setdefault("cuda", torch.version.cuda)
        info.setdefault("device", torch.cuda.get_device_name())
    return info


def save_table(name: str, headers: list, rows: list, meta: dict, out: str | None = None) -> None:
    """``{out}/{name}.json`` (meta + rows as dicts) and ``{out}/{name}.csv``; out defaults to $OUT or '.'.

    Also appends one line per row (row dict + ``run_info(meta)``) to ``{out}/{name}.jsonl``
    and to ``benchmarks/results/{name}.jsonl``.
    """
    out = out or os.environ.get("OUT") or "."
    os.makedirs(out, exist_ok=True)
    records = [dict(zip(headers, row)) for row in rows]
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({**meta, "rows": records}, f, indent=1)
    with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(headers)
        w.writerows(rows)
    info = run_info(meta)
    lines = "".join(json.dumps({**info, **record}, default=str) + "\n" for record in records)
    os.makedirs(RESULTS, exist_ok=True)
    paths = {os.path.realpath(os.path.join(d, f"{name}.jsonl")) for d in (out, RESULTS)}  # once if out is RESULTS
    for path in sorted(paths):
        with open(path, "a") as f:
            f.write(lines)
