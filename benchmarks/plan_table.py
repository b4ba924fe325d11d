"""The docs/memory.md table: peaks predicted by ``flowkern plan`` (GPU mode), not measured on a GPU.

B = 1, LoRA r = 16, bf16 frozen weights, the CLI's defaults for real pipelines (per-block checkpointing of the
backbone, per-layer of the VAE, micro-batch 1, N = 20). Each row is one ``plan()`` call (minutes on this shared
CPU); rows are appended to ``--out`` as they finish, so a partial run keeps what it computed.

    python benchmarks/plan_table.py --out benchmarks/results/plan/table.json
    python benchmarks/plan_table.py --markdown benchmarks/results/plan/table.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

GIB = 2**30
METHODS = {  # row label -> knobs
    "VGG-Flow fd": dict(method="vggflow", consistency="fd"),
    "VGG-Flow exact": dict(method="vggflow", consistency="exact"),
    "DAM K=1": dict(method="dam", K=1),
    "DAM K=3": dict(method="dam", K=3),
    "DAM K=N": dict(method="dam", K=20),
    "DRaFT-K (K=1)": dict(method="draft", K=1),
    "ReFL": dict(method="refl"),
}
MODELS = [("sd3-medium", 1024), ("sd3-medium", 512), ("sit-xl-2", 256), ("sit-xl-2", 512), ("flux2-klein-4b", 512),
          ("flux2-klein-4b", 1024), ("sd3.5-large", 512), ("sd3.5-large", 1024), ("flux1-dev", 512),
          ("flux1-dev", 1024)]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/plan/table.json")
    parser.add_argument("--markdown", help="print the markdown table of this JSON file and exit")
    parser.add_argument("--models", nargs="*", default=None, help="model:resolution pairs [all]")
    parser.add_argument("--methods", nargs="*", default=None, help=f"row labels [{', '.join(METHODS)}]")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.load(open(args.markdown))))
        return 0
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
    from flowkern.app.plan import fits, plan

    models = [(m.split(":")[0], int(m.split(":")[1])) for m in args.models] if args.models else MODELS
    records = json.load(open(args.out)) if os.path.isfile(args.out) else []
    done = {(r["model"], r["resolution"], r["row"]) for r in records}
    for model, resolution in models:
        for row in args.methods or METHODS:
            if (model, resolution, row) in done:
                continue
            p = plan(
                model, device="cuda", resolution=resolution, batch=1, lora_rank=16, precision="bf16", **METHODS[row]
            )
            records.append({"model": model, "resolution": resolution, "row": row, "needs_bytes": fits(p), "plan": p})
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)
            print(f"{model} {resolution}px {row}: {fits(p) / GIB:.2f} GiB ({p['seconds']} s)", flush=True)
    return 0


def markdown(records: list[dict]) -> str:
    """One line per prediction: GiB a card needs (allocator peak + CUDA context), and its parts."""
    lines = [
        "| model | px | method | card needs (GiB) | weights | update peak | peak phase | planned in |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        p = r["plan"]
        weights = sum(p["resident"].values())
        lines.append(
            f"| {r['model']} | {r['resolution']} | {r['row']} | **{r['needs_bytes'] / GIB:.1f}** | "
            f"{weights / GIB:.1f} | {p['update']['peak_bytes'] / GIB:.2f} | {p['update']['peak_phase']} | "
            f"{p['seconds']:.0f} s |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
