"""The docs/memory.md table: peaks predicted by ``flowkern plan`` (GPU mode), not measured on a GPU.

B = 1, LoRA r = 16, bf16 frozen weights, the CLI's defaults for real pipelines (per-block checkpointing of the
backbone, per-layer of the VAE, micro-batch 1, N = 20), and the planner's choice (``plan.choose``) under each
budget. Each record is one (model, resolution, row, base precision); records are appended to ``--out`` as they
finish and a rerun skips the ones there (``--redo`` recomputes), so the lead can rerun it after other branches
merge and a partial run keeps what it computed.

    python benchmarks/plan_table.py --out benchmarks/results/plan/table.json
    python benchmarks/plan_table.py --models sd3-medium:1024 --methods "DAM K=3" --budgets 24GB 16GB
    python benchmarks/plan_table.py --models flux1-dev:512 --base-precision int8
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
BUDGETS = ("24GB", "16GB")


def run_record(model: str, resolution: int, row: str, base_precision: str | None, budgets: list[str]) -> dict:
    """One record: the default knobs' prediction and, per budget, the planner's choice (or what nothing-fits needs).
    One pass of ``plan.choose_each`` over the candidates from the defaults on (``candidate_knobs(faster=False)``,
    with the int8 / fp8 base step where the base is bf16 or int8) serves every budget: a budget the defaults fit
    chooses the defaults with no search; the faster settings with less checkpointing are not tried (CPU time)."""
    import time

    from flowkern.app.plan import candidate_knobs, choose_each, fits, parse_budget, quantized_bases

    start = time.perf_counter()
    cache: dict[str, dict] = {}

    def cached_plan(model, device="cuda", **knobs):
        key = _plan_key(model, device, knobs)
        if key not in cache:
            cache[key] = _disk_plan(model, device, knobs)
        return cache[key]

    knobs = dict(resolution=resolution, batch=1, lora_rank=16, precision="bf16", **METHODS[row])
    if base_precision:
        knobs["base_precision"] = base_precision
    default = cached_plan(model, device="cuda", **knobs)
    record = {"model": model, "resolution": resolution, "row": row, "base_precision": base_precision,
              "needs_bytes": fits(default), "plan": default, "choices": {}}  # fmt: skip
    if budgets:
        candidates = candidate_knobs(knobs, quantized_bases(model, "cuda"), faster=False)
        results = choose_each(model, [parse_budget(b) for b in budgets], candidates=candidates, plan_fn=cached_plan,
                              **knobs)  # fmt: skip
        for budget, chosen in zip(budgets, results, strict=True):
            if chosen["choice"] is None:
                record["choices"][budget] = {"choice": None, "needs_bytes": chosen["needs_bytes"],
                                             "error": chosen["error"], "tried": chosen["tried"],
                                             "unplanned": chosen.get("unplanned", False)}  # fmt: skip
            else:
                record["choices"][budget] = {"choice": chosen["choice"], "knobs": chosen["prediction"]["knobs"],
                                             "needs_bytes": fits(chosen["prediction"]),
                                             "tried": chosen["tried"]}  # fmt: skip
    record["plan_seconds"] = round(sum(p["seconds"] for p in cache.values()), 1)  # wall s of the plans it used
    record["wall_seconds"] = round(time.perf_counter() - start, 1)  # this run's (plans cached earlier cost ~0)
    record["plans"] = len(cache)
    return record


PLAN_CACHE: str | None = None  # --cache: a JSON-lines file of every plan computed (a killed run loses none)


def _plan_key(model: str, device: str, knobs: dict) -> str:
    """The plan's identity: the model, the device and every knob as :class:`Knobs` fills it (None values left out,
    so a knob added later with a None default keeps the old keys)."""
    from flowkern.app.plan_models import Knobs

    k = {**knobs}
    extrapolate = k.pop("extrapolate", True)
    full = {name: v for name, v in Knobs(**k).__dict__.items() if v is not None}
    return json.dumps({"model": model, "device": device, "extrapolate": extrapolate, **full}, sort_keys=True)


def _disk_plan(model: str, device: str, knobs: dict) -> dict:
    """``plan(...)``, read from / appended to :data:`PLAN_CACHE` when one is given."""
    from flowkern.app.plan import fits, plan

    key = _plan_key(model, device, knobs)
    if PLAN_CACHE and os.path.isfile(PLAN_CACHE):
        with open(PLAN_CACHE) as f:
            for line in f:
                entry = json.loads(line)
                if entry["key"] == key and "error" in entry:
                    raise RuntimeError(entry["error"])
                if entry["key"] == key:
                    return entry["plan"]
    try:
        prediction = plan(model, device=device, **knobs)
    except RuntimeError as err:  # the extrapolation refused: cached too, a rerun does not trace it again
        if PLAN_CACHE:
            with open(PLAN_CACHE, "a") as f:
                f.write(json.dumps({"key": key, "error": str(err)}) + "\n")
        raise
    if PLAN_CACHE:
        with open(PLAN_CACHE, "a") as f:
            f.write(json.dumps({"key": key, "plan": prediction}) + "\n")
    print(f"  planned {key}: {fits(prediction) / GIB:.2f} GiB in {prediction['seconds']} s", flush=True)
    return prediction


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/plan/table.json")
    parser.add_argument("--markdown", help="print the markdown table of this JSON file and exit")
    parser.add_argument("--models", nargs="*", default=None, help="model:resolution pairs [all]")
    parser.add_argument("--methods", nargs="*", default=None, help=f"row labels [{', '.join(METHODS)}]")
    parser.add_argument("--budgets", nargs="*", default=list(BUDGETS), help="budgets for the choice columns")
    parser.add_argument("--base-precision", nargs="+", default=["bf16"], choices=["bf16", "int8", "fp8"],
                        help="frozen base precisions, each a set of records [bf16]")  # fmt: skip
    parser.add_argument("--redo", action="store_true", help="recompute records already in --out")
    parser.add_argument("--cache", default=None, help="JSON-lines file of the plans computed (reused by reruns)")
    args = parser.parse_args(argv)
    global PLAN_CACHE
    PLAN_CACHE = args.cache
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return 0
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

    models = [(m.split(":")[0], int(m.split(":")[1])) for m in args.models] if args.models else MODELS
    for row in args.methods or []:
        if row not in METHODS:
            parser.error(f"--methods: unknown row {row!r}; known: {', '.join(METHODS)}")
    for model, resolution in models:
        for base_precision, row in [(b, r) for b in args.base_precision for r in args.methods or METHODS]:
            base_precision = None if base_precision == "bf16" else base_precision
            key = (model, resolution, row, base_precision)
            done = [r for r in _load(args.out) if _key(r) == key and set(args.budgets) <= set(r.get("choices", {}))]
            if done and not args.redo:
                continue
            record = run_record(model, resolution, row, base_precision, args.budgets)
            records = [r for r in _load(args.out) if _key(r) != key] + [record]  # reread: a parallel run's rows
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)
            print(f"{_line(record)} ({record['plans']} plans: {record['plan_seconds']} s planning, "
                  f"{record['wall_seconds']} s here)", flush=True)  # fmt: skip
    return 0


def _load(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def _key(r: dict) -> tuple:
    return (r["model"], r["resolution"], r["row"], r.get("base_precision"))


def _choice_cell(c: dict | None, base_precision: str | None) -> str:
    """'defaults: GiB', or what the choice changes from them (base precision, offload, sublayer recompute, K)."""
    if c is None:
        return "not planned"
    if c.get("unplanned"):
        return "not planned (the extrapolation refused a candidate)"
    if c["choice"] is None:
        return f"nothing fits: needs {c['needs_bytes'] / GIB:.1f}"
    k = c["knobs"]
    changes = [f"{k['base_precision']} base"] if k.get("base_precision") != base_precision else []
    changes += ["offload"] if k.get("offload_trajectory") else []
    changes += ["sublayer"] if k.get("recompute") == "sublayer" else []
    changes += ["K=1"] if "K = 1" in c["choice"] else []
    return f"{' + '.join(changes) or 'defaults'}: {c['needs_bytes'] / GIB:.1f}"


def _line(r: dict) -> str:
    p = r["plan"]
    weights = sum(p["resident"].values())
    base = r.get("base_precision") or "bf16"
    choices = [_choice_cell(r["choices"].get(b), r.get("base_precision")) for b in BUDGETS]
    return (
        f"| {r['model']} | {r['resolution']} | {r['row']} | {base} | **{r['needs_bytes'] / GIB:.1f}** | "
        f"{weights / GIB:.1f} | {p['update']['peak_bytes'] / GIB:.2f} | {p['update']['peak_phase']} | "
        + " | ".join(choices)
        + f" | {r.get('plan_seconds', r.get('seconds'))} |"
    )


def markdown(records: list[dict]) -> str:
    """One line per record: GiB a card needs (allocator peak + CUDA context) with the default knobs, its parts, and
    the planner's choice (and the GiB it needs) under each budget."""
    lines = [
        "| model | px | method | base | card needs (GiB) | weights | update peak | peak phase | "
        + " | ".join(f"choice under {b}: GiB" for b in BUDGETS)
        + " | plan s |",
        "|---|---|---|---|---|---|---|---|" + "---|" * (len(BUDGETS) + 1),
    ]
    order = {m: i for i, m in enumerate(dict.fromkeys(m for m, _ in MODELS))}
    rows = {r: i for i, r in enumerate(METHODS)}
    records = sorted(records, key=lambda r: (order.get(r["model"], 99), r["resolution"],
                                             r.get("base_precision") or "", rows.get(r["row"], 99)))  # fmt: skip
    lines += [_line(r) for r in records]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
