"""The README's GPU status block, generated from the committed GPU results (issue 19).

A lease's scripts/gpu_check.sh OUTDIR writes OUTDIR/gpu_check.json; committed as
benchmarks/results/<device>/gpu_check.json (device: e.g. h100, from the GPU's name), it is what this script reads.
The block sits between the markers below in README.md; tests/test_gpu_status.py checks that it matches.

    python benchmarks/gpu_status.py            # print the block
    python benchmarks/gpu_status.py --write    # rewrite README.md's block
"""

from __future__ import annotations

import argparse
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- gpu-status:begin (benchmarks/gpu_status.py) -->", "<!-- gpu-status:end -->"
NONE_YET = (
    "No GPU has run flowkern yet: no `benchmarks/results/<device>/gpu_check.json` is committed. The first lease runs "
    "`scripts/gpu_check.sh` (the CUDA build, `pytest -m gpu`, compute-sanitizer, the op and adjoint benchmarks and "
    "one update per method on the SD3-medium config; [docs/gpu_check.md](docs/gpu_check.md))."
)


def gpu_results(root: str = ROOT) -> list[tuple[str, dict]]:
    """(device folder, gpu_check.json) of every committed GPU run that was not a dry run, sorted by folder."""
    out = []
    for path in sorted(glob.glob(os.path.join(root, "benchmarks", "results", "*", "gpu_check.json"))):
        with open(path) as f:
            result = json.load(f)
        if not result.get("dry_run"):
            out.append((os.path.basename(os.path.dirname(path)), result))
    return out


def _stage_line(name: str, stage: dict) -> str:
    mark = "ok" if stage.get("ok") else "**not ok**"
    if name == "tests":
        failed = stage.get("failures", 0) + stage.get("errors", 0)
        return f"{mark}: {stage.get('tests', 0)} tests, {failed} failed, {stage.get('skipped', 0)} skipped"
    if name in ("smoke", "memcheck", "racecheck"):
        extra = f", sanitizer errors {stage.get('sanitizer_errors')}" if name != "smoke" else ""
        return f"{mark}: {stage.get('passed', 0)}/{stage.get('checks', 0)} checks{extra}"
    if name == "bench":
        return f"{mark}: {stage.get('cases', 0)} cases"
    if name == "updates":
        rows = stage.get("rows", [])
        return f"{mark}: {sum('error' not in r for r in rows)}/{len(rows)} updates"
    return mark


def block(root: str = ROOT) -> str:
    """The markdown between the markers: one paragraph per committed GPU run, or the none-yet line."""
    runs = gpu_results(root)
    if not runs:
        return NONE_YET
    parts = []
    for device, result in runs:
        stages = result.get("stages", {})
        env = stages.get("env", {}).get("info", {})
        head = (f"GPU run on {env.get('gpu', device)} (`benchmarks/results/{device}/gpu_check.json`, torch "
                f"{env.get('torch')}, {result.get('elapsed_s')} s): ")  # fmt: skip
        parts.append(head + "; ".join(f"{n} {_stage_line(n, s)}" for n, s in stages.items() if isinstance(s, dict)))
        targets = stages.get("bench", {}).get("targets", [])
        b8 = [t for t in targets if str(t.get("shape", "")).endswith("_B8")]
        if b8:
            fr = [t["fraction_of_copy_bandwidth"] for t in b8 if t.get("fraction_of_copy_bandwidth") is not None]
            vc = [t["vs_compile"] for t in b8 if t.get("vs_compile") is not None]
            ve = [t["vs_eager"] for t in b8 if t.get("vs_eager") is not None]
            parts.append(
                f"Loss ops at B = 8 ({len(b8)} cases): worst {min(fr):.0%} of copy bandwidth kernel-only (target 90%), "
                f"worst {min(vc):.2f}x torch.compile (target 1.2x), worst {min(ve):.2f}x eager (target 4x)."
                if fr and vc and ve
                else f"Loss ops at B = 8: {len(b8)} cases, incomplete comparisons (see the JSON)."
            )
        vgg = [r for r in stages.get("updates", {}).get("rows", []) if r.get("name") == "sd3-medium/vggflow/1024px/B1"]
        if vgg and "max_memory_allocated" in vgg[0]:
            gb = vgg[0]["max_memory_allocated"] / 1e9
            parts.append(f"SD3-medium VGG-Flow at 1024 px, B = 1: {vgg[0]['seconds_per_update']:.2f} s/update, "
                         f"{gb:.1f} GB max_memory_allocated (target under 24 GB).")  # fmt: skip
    return "\n\n".join(parts)


def readme_block(readme: str) -> str:
    """The text between the markers in `readme` (ValueError when a marker is missing)."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite README.md's block")
    args = parser.parse_args(argv)
    text = block()
    if not args.write:
        print(text)
        return
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        readme = f.read()
    old = readme_block(readme)
    with open(path, "w") as f:
        f.write(readme.replace(f"{BEGIN}\n{old}\n{END}", f"{BEGIN}\n{text}\n{END}"))


if __name__ == "__main__":
    main()
