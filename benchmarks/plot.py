"""Summarise a pytest-benchmark JSON: a markdown table of median times per provider, the speed-up of
the fastest flowkern backend over eager PyTorch and torch.compile, GB/s and peak extra memory; charts.

    python benchmarks/plot.py RESULT.json [--png OUT.png] [--charts DIR] [--strip]

--png: one bar chart of the speed-ups over eager. --charts: one chart per op (DIR/<op>.png), provider x case
(shape, mode, dtype): the median time on top and the fraction of the copy bandwidth below (GB/s on a CPU run,
which measures no copy bandwidth), as kernel libraries present theirs.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load_rows(path: str) -> list[dict]:
    with open(path) as f:
        text = f.read()
    if not text.strip():
        raise SystemExit(f"{path} is empty: was the run made with --benchmark-disable?")
    data = json.loads(text)
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "provider" not in info:
            continue
        median = info.get("ms_p50")
        median = median * 1e-3 if median is not None else (bench.get("stats") or {}).get("median")
        if median is None:
            continue
        rows.append({**info, "seconds": median})
    return rows


def table(rows: list[dict]) -> str:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        groups[(r["op"], r.get("shape_name", str(r["shape"])), r["mode"], r["dtype"])][r["provider"]] = r
    lines = [
        "| op | shape | mode | dtype | eager ms | compile ms | flowkern ms (backend) | vs eager | vs compile "
        "| GB/s | extra mem / input |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (op, shape, mode, dtype), by in sorted(groups.items()):
        fk = [r for p, r in by.items() if p.startswith("flowkern_")]
        if not fk:
            continue
        best = min(fk, key=lambda r: r["seconds"])
        eager, comp = by.get("torch"), by.get("torch_compile")
        numel = 1
        for s in best["shape"]:
            numel *= s
        input_bytes = numel * (2 if dtype in ("bf16", "fp16") else 4)

        def ms(r):
            return f"{r['seconds'] * 1e3:.3f}" if r else "-"

        def ratio(r, best=best):
            return f"{r['seconds'] / best['seconds']:.2f}x" if r else "-"

        gbs = best.get("gb_per_s")
        mem = best.get("peak_extra_memory_bytes")
        lines.append(
            f"| {op} | {shape} | {mode} | {dtype} | {ms(eager)} | {ms(comp)} | "
            f"{ms(best)} ({best['provider'].removeprefix('flowkern_')}) | {ratio(eager)} | {ratio(comp)} | "
            f"{gbs:.1f} | {mem / input_bytes:.2f} |"
            if gbs is not None and mem is not None
            else f"| {op} | {shape} | {mode} | {dtype} | {ms(eager)} | {ms(comp)} | "
            f"{ms(best)} ({best['provider'].removeprefix('flowkern_')}) | {ratio(eager)} | {ratio(comp)} | - | - |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--png", help="also write a bar chart of the speed-ups")
    parser.add_argument("--charts", metavar="DIR", help="also write one chart per op: time and fraction of bandwidth")
    parser.add_argument("--strip", action="store_true", help="drop per-round raw timings from the JSON, in place")
    args = parser.parse_args(argv)
    if args.strip:  # pytest-benchmark keeps every round: MBs per run; the statistics are what gets committed
        with open(args.json) as f:
            data = json.load(f)
        for bench in data["benchmarks"]:
            bench.get("stats", {}).pop("data", None)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    rows = load_rows(args.json)
    print(table(rows))
    if args.png:
        write_speedup_chart(rows, args.png)
    if args.charts:
        for path in write_op_charts(rows, args.charts):
            print(path)


def write_speedup_chart(rows: list[dict], path: str) -> str:
    """A horizontal bar chart of the fastest flowkern backend's speed-up over eager PyTorch per benchmark case."""
    from flowkern.app.report import figure

    by = defaultdict(dict)
    for r in rows:
        by[(r["op"], r.get("shape_name"), r["mode"], r["dtype"])][r["provider"]] = r["seconds"]
    labels, speedups = [], []
    for key, d in sorted(by.items()):
        fk = [v for p, v in d.items() if p.startswith("flowkern_")]
        if fk and "torch" in d:
            labels.append(" ".join(str(k) for k in key))
            speedups.append(d["torch"] / min(fk))
    if not labels:
        raise SystemExit("no case has both a torch and a flowkern timing: nothing to chart")
    fig = figure(1000, 30 * len(labels) + 100)
    ax = fig.subplots()
    ax.barh(labels, speedups)
    ax.axvline(1.0, color="k", lw=0.5)
    ax.invert_yaxis()  # first case on top, as in the table
    ax.set_xlabel("speed-up over eager PyTorch")
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_op_charts(rows: list[dict], out_dir: str) -> list[str]:
    """One PNG per op (and adjoint-matching mode): grouped bars, provider x case, of the median time (top) and of
    the fraction of the copy bandwidth (bottom; GB/s where no copy bandwidth was measured)."""
    import os

    from flowkern.app.report import figure

    ops: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        op = r["op"] + (f"-{r['am_mode']}" if r.get("am_mode") else "")
        ops[op][f"{r.get('shape_name', r.get('shape'))}\n{r['mode']} {r['dtype']}"][r["provider"]] = r
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for op, cases in sorted(ops.items()):
        providers = sorted({p for by in cases.values() for p in by})
        labels = sorted(cases)
        fraction = any(by[p].get("fraction_of_copy_bandwidth") is not None for by in cases.values() for p in by)
        fig = figure(max(600, 120 * len(labels) + 200), 700)
        top, bottom = fig.subplots(2, 1, sharex=True)
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(labels))]
            times = [cases[c][provider]["seconds"] * 1e3 if provider in cases[c] else 0.0 for c in labels]
            key = "fraction_of_copy_bandwidth" if fraction else "gb_per_s"
            other = [(cases[c].get(provider, {}).get(key) or 0.0) * (100 if fraction else 1) for c in labels]
            top.bar(xs, times, width, label=provider)
            bottom.bar(xs, other, width, label=provider)
        top.set_ylabel("median ms")
        top.set_title(op)
        top.legend(fontsize="small")
        bottom.set_ylabel("% of copy bandwidth" if fraction else "GB/s")
        if fraction:
            bottom.axhline(90, color="k", lw=0.5, ls="--")  # issue 19's target for the loss ops
        bottom.set_xticks(range(len(labels)), labels, fontsize="small")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()
