"""Criteo preprocessing throughput: dfa_lightning's CriteoDataModule cache versus torchfm 0.7's CriteoDataset.

Builds a ``--rows``-row file by repeating the real 10k-row sample (``$DFA_DATA_DIR/criteo/train_10k.txt``) in a
temporary folder, then times, each in a fresh subprocess (imports excluded from the timing, cache writes included):

* ours: :func:`dfa_lightning.data.criteo.ensure_cache` (fingerprint, two passes, atomic rename), median of
  ``--repeat`` runs;
* torchfm (with ``--torchfm [PYTHON]``): ``torchfm.dataset.criteo.CriteoDataset(path, cache_path=...)`` (counting
  pass + LMDB cache), one run, with an interpreter that has torchfm 0.7, lmdb and tqdm. If torchfm cannot be
  imported that half is skipped. It also checks that both encodings agree on the first ``--check-rows`` rows (same
  field_dims, same rare bucket, one-to-one id mapping per field).

Set up a torchfm interpreter without touching the project venv, e.g.::

    python -m venv /tmp/benchvenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/benchvenv/lib/python3.11/site-packages/main.pth
    /tmp/benchvenv/bin/pip install --no-deps torchfm==0.7.0 lmdb tqdm
    python benchmarks/bench_criteo_preprocess.py --torchfm /tmp/benchvenv/bin/python

Results go to ``benchmarks/results/criteo_preprocess.{json,md}`` with a description of the machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("DFA_DATA_DIR", "../shared/data")) / "criteo" / "train_10k.txt"  # the data root

OURS = """
import json, resource, sys, time
sys.path.insert(0, {src!r})
from dfa_lightning.data import criteo
t = time.perf_counter()
folder, meta, built = criteo.ensure_cache({path!r}, {cache!r}, min_threshold=10, log_every=0)
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "rows": meta["rows"], "field_dims": meta["field_dims"], "folder": str(folder),
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

TORCHFM = """
import json, resource, struct, time
import numpy as np
try:
    from torchfm.dataset.criteo import CriteoDataset
except Exception as err:
    print(json.dumps({{"skipped": f"torchfm not importable: {{type(err).__name__}}: {{err}}"}}))
    raise SystemExit(0)
t = time.perf_counter()
dataset = CriteoDataset({path!r}, cache_path={cache!r}, min_threshold=10)
seconds = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
dims = [int(d) for d in dataset.field_dims]
check = {{}}
if {ours!r}:
    x = np.load({ours!r} + "/x.npy", mmap_mode="r")
    n = min({check_rows}, len(dataset))
    with dataset.env.begin(write=False) as txn:
        ref = np.stack([np.frombuffer(txn.get(struct.pack(">I", i)), dtype=np.uint32) for i in range(n)])
    ours_local = np.asarray(x[:n], dtype=np.int64) - np.concatenate(([0], np.cumsum(dims)[:-1]))
    agree = True
    for f in range(39):
        a, b = ref[:, f + 1].astype(np.int64), ours_local[:, f]
        pairs = len(np.unique(a * (1 << 32) + b))
        agree &= pairs == len(np.unique(a)) == len(np.unique(b))  # one-to-one mapping between the two id sets
        agree &= bool(np.all((a == dims[f] - 1) == (b == dims[f] - 1)))  # the same rows fall in the rare bucket
    check = {{"rows_compared": n, "encodings_agree": bool(agree)}}
print(json.dumps({{"seconds": seconds, "rows": len(dataset), "field_dims": dims, "max_rss_mb": rss, **check}}))
"""


def run(python: str, code: str, timeout: int = 900) -> dict:
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import numpy
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def make_file(path: Path, rows: int) -> None:
    sample = SAMPLE.read_bytes()
    lines = sample.splitlines(keepends=True)
    with open(path, "wb") as fh:
        for _ in range(rows // len(lines)):
            fh.write(sample)
        fh.write(b"".join(lines[: rows % len(lines)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the repeated-sample file")
    parser.add_argument("--torchfm", nargs="?", const=sys.executable, default=None, metavar="PYTHON",
                        help="also time torchfm 0.7 with this interpreter (default: this one)")
    parser.add_argument("--torchfm-rows", type=int, default=None, help="rows for torchfm if fewer (slow)")
    parser.add_argument("--repeat", type=int, choices=range(1, 101), metavar="1..100", default=3,
                        help="runs of ours (median reported)")
    parser.add_argument("--check-rows", type=int, default=20_000, help="rows compared between both encodings")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    args = parser.parse_args()

    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "args": {
        "rows": args.rows, "torchfm_rows": args.torchfm_rows or args.rows, "repeat": args.repeat}}
    src = str(ROOT / "src")
    with tempfile.TemporaryDirectory(prefix="bench-criteo-") as tmp:
        tmp = Path(tmp)
        data = tmp / "train.txt"
        make_file(data, args.rows)
        info["file_bytes"] = data.stat().st_size
        runs = []
        for i in range(args.repeat):
            runs.append(run(sys.executable, OURS.format(src=src, path=str(data), cache=str(tmp / f"cache{i}"))))
            print(f"ours run {i + 1}: {runs[-1]['rows'] / runs[-1]['seconds']:,.0f} rows/s", flush=True)
        seconds = statistics.median(r["seconds"] for r in runs)
        ours = {"rows": runs[0]["rows"], "seconds": round(seconds, 3), "rows_per_s": round(runs[0]["rows"] / seconds),
                "all_rows_per_s": [round(r["rows"] / r["seconds"]) for r in runs],
                "max_rss_mb": round(max(r["max_rss_mb"] for r in runs)), "sum_field_dims": sum(runs[0]["field_dims"])}
        info["ours"] = ours
        if args.torchfm:
            tf_rows = args.torchfm_rows or args.rows
            tf_data = data
            ours_folder = runs[0]["folder"]
            if tf_rows != args.rows:  # same file for both, so the encodings can be compared
                tf_data = tmp / "train_torchfm.txt"
                make_file(tf_data, tf_rows)
                ours_folder = run(sys.executable, OURS.format(src=src, path=str(tf_data), cache=str(tmp / "c_tf")))
                ours_folder = ours_folder["folder"]
            print("torchfm ...", flush=True)
            tf = run(args.torchfm, TORCHFM.format(path=str(tf_data), cache=str(tmp / "torchfm_lmdb"),
                                                  ours=ours_folder, check_rows=args.check_rows))
            if "skipped" in tf:
                info["torchfm"] = tf
            else:
                tf["rows_per_s"] = round(tf["rows"] / tf["seconds"])
                tf["seconds"] = round(tf["seconds"], 3)
                tf["max_rss_mb"] = round(tf["max_rss_mb"])
                tf["sum_field_dims"] = sum(tf.pop("field_dims"))
                info["torchfm"] = tf
                info["speedup"] = round(ours["rows_per_s"] / tf["rows_per_s"], 2)
        info["machine"]["load_average_at_end"] = os.getloadavg()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "criteo_preprocess.json").write_text(json.dumps(info, indent=2) + "\n")
    (args.out / "criteo_preprocess.md").write_text(report(info))
    print(report(info))


def report(info: dict) -> str:
    m, ours, tf = info["machine"], info["ours"], info.get("torchfm")
    lines = [
        "# Criteo preprocessing throughput",
        "",
        f"Produced by `benchmarks/bench_criteo_preprocess.py` on {info['date']}.",
        f"Input: the real 10k-row sample repeated to {ours['rows']:,} rows ({info['file_bytes'] / 1e6:.0f} MB), "
        "min_threshold 10. Timings exclude interpreter start and imports and include writing each tool's cache.",
        "",
        "| preprocessing | rows | seconds | rows/s | peak RSS (MB) | sum(field_dims) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| dfa_lightning `CriteoDataModule` cache (median of {len(ours['all_rows_per_s'])}) | {ours['rows']:,} | "
        f"{ours['seconds']} | **{ours['rows_per_s']:,}** | {ours['max_rss_mb']} | {ours['sum_field_dims']:,} |",
    ]
    if tf and "skipped" not in tf:
        lines.append(f"| torchfm 0.7 `CriteoDataset` (1 run) | {tf['rows']:,} | {tf['seconds']} | "
                     f"**{tf['rows_per_s']:,}** | {tf['max_rss_mb']} | {tf['sum_field_dims']:,} |")
    lines += ["", f"All runs of ours (rows/s): {', '.join(f'{r:,}' for r in ours['all_rows_per_s'])}."]
    if tf and "skipped" not in tf:
        lines += [
            "",
            f"**Speed-up: {info['speedup']}x** torchfm's rows/s"
            + (f" (torchfm timed on {tf['rows']:,} rows)." if tf["rows"] != ours["rows"] else " on the same file."),
            "",
            f"Same encoding: {tf.get('encodings_agree')} on the first {tf.get('rows_compared', 0):,} rows (equal "
            "field_dims, same rows in the rare bucket, one-to-one id mapping per field; torchfm numbers a field's "
            "values in Python set order, we in sorted order).",
        ]
    elif tf:
        lines += ["", f"torchfm half skipped: {tf['skipped']}"]
    lines += [
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores (shared with other jobs: load average "
        f"{', '.join(f'{v:.2f}' for v in m['load_average_at_start'])} at start, "
        f"{', '.join(f'{v:.2f}' for v in m['load_average_at_end'])} at end; absolute numbers are noisy, the ratio "
        "is measured under the same conditions)",
        f"- Python {m['python']}, numpy {m['numpy']}, torch {m['torch']}, {m['platform']}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
