"""Reward parity with the original implementations (issue 18; docs/rewards.md "Parity"). Not collected by pytest.

Two steps, because the originals need environments the project's cannot hold (docs/rewards.md):

1. ``golden``: in the original's environment, build the ORIGINAL model (open_clip's ``CLIP``, the
   ``image-reward`` package's ``ImageReward``, OpenAI ``clip`` + ImageReward's aesthetic ``MLP``) with seeded
   random weights and score natural-looking images: scores, d score / d images, and the PIL-vs-tensor
   preprocessing gap -> ``OUT/<reward>_<size>.{json,safetensors}``.
2. ``compare``: in flowkern's environment, regenerate the same weights (digest-checked), save them in the
   original file format, load them through ``flowkern.rewards.build_reward`` and compare.

``hf`` compares PickScore / CLIPScore with transformers' own ``CLIPModel`` forward (their original code) in one
process. ``tiny`` sizes are the CI fixtures (tests/data/rewards_parity, checked by tests/test_rewards_parity.py);
``real`` sizes (ViT-H-14, BLIP ViT-L + bert-base, ViT-L/14) need ~10 GB: run them under the heavy-job lock.

    PYTHONPATH=/work/parity/oc:. python -m benchmarks.rewards_parity golden --reward hps --size real --out DIR
    PYTHONPATH=. /work/venv-ir/bin/python -m benchmarks.rewards_parity golden --reward imagereward --size real ...
    flock /tmp/flowkern-heavy.lock python -m benchmarks.rewards_parity compare --golden DIR/hps_real \
        --results benchmarks/results/rewards/parity.json
    flock /tmp/flowkern-heavy.lock python -m benchmarks.rewards_parity hf --reward pickscore --size real ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.rewards_originals import (  # noqa: E402
    flowkern_reward_from_golden,
    flowkern_vs_golden,
    golden_run,
    hf_clip_parity,
    load_golden,
    save_golden,
)

ARCHITECTURES = {
    "hps": "open_clip ViT-H-14 (32+24 layers, 224 px)",
    "imagereward": "BLIP ViT-L/16 224 px + bert-base with cross-attention + MLP",
    "aesthetic": "OpenAI CLIP ViT-L/14 224 px + LAION MLP 768-1024-128-64-16-1",
    "pickscore": "CLIPModel ViT-H/14 (laion config), 224 px",
    "clipscore": "CLIPModel ViT-L/14 (OpenAI config, quick_gelu), 224 px",
}


def report(results_path: str) -> str:
    """parity.md from parity.json."""
    with open(results_path) as f:
        rows = json.load(f)
    lines = [
        "# Reward parity with the original implementations (fp32, CPU)",
        "",
        "`python -m benchmarks.rewards_parity` (golden run in the original's environment, compare in flowkern's;",
        "see docs/rewards.md). Scores and d score / d images on the same natural-looking images and prompts;",
        '"rel" = max |diff| / max |original|. Preprocessing gap: the original model on the original\'s PIL',
        "preprocessing vs on flowkern's tensor preprocessing of the same uint8 images.",
        "",
        "| reward | size | original | architecture | score max abs | score max rel | grad max rel | grad cosine "
        "| tokens equal | PIL gap max / mean | score std across images |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(rows):
        r = rows[key]
        orig = (
            r["original"] if isinstance(r["original"], str) else ", ".join(f"{k} {v}" for k, v in r["original"].items())
        )
        arch = ARCHITECTURES[r["reward"]] if r["size"] == "real" else "reduced sizes, same structure"
        gap = r["preprocessing_gap"]
        lines.append(
            f"| {r['reward']} | {r['size']} | {orig} | {arch} | {r['score']['max_abs']:.2e} | "
            f"{r['score']['max_rel']:.2e} | {r['grad']['max_rel']:.2e} | {r['grad'].get('cosine', float('nan')):.9f} | "
            f"{r.get('token_ids_equal', 'n/a')} | {gap['max_abs']:.2e} / {gap['mean_abs']:.2e} | "
            f"{gap['score_std_across_images']:.3g} (n={gap['n_images']}) |"
        )
    lines += ["", "Tolerance (CI, tests/test_rewards_parity.py): 1e-5 relative for fp32 scores and gradients."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["golden", "compare", "hf", "report"])
    p.add_argument("--reward", choices=["hps", "imagereward", "aesthetic", "pickscore", "clipscore"])
    p.add_argument("--size", choices=["tiny", "real"], default="tiny")
    p.add_argument("--out", default="tests/data/rewards_parity", help="golden: output folder")
    p.add_argument("--golden", help="compare: path stem of a golden run (OUT/<reward>_<size>)")
    p.add_argument("--results", help="append the comparison to this JSON file (keyed by reward_size)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.step == "report":
        text = report(args.results)
        with open(os.path.splitext(args.results)[0] + ".md", "w") as f:
            f.write(text)
        print(text)
        return
    if args.step == "golden":
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"{args.reward}_{args.size}")
        meta, tensors = golden_run(
            args.reward, args.size, tokenizer_dir=stem + "_tokenizer" if args.size == "real" else None
        )
        save_golden(meta, tensors, stem)
        print(f"{stem}: scores {tensors['scores'].tolist()} ({time.time() - t0:.0f} s)")
        return
    if args.step == "compare":
        meta, tensors = load_golden(args.golden)
        with tempfile.TemporaryDirectory() as work:
            tok = args.golden + "_tokenizer" if meta["size"] == "real" else None
            reward = flowkern_reward_from_golden(meta, work, tokenizer_dir=tok)
            result = flowkern_vs_golden(meta, tensors, reward)
        result = {"reward": meta["reward"], "size": meta["size"], "original": meta["packages"], **result}
    else:
        with tempfile.TemporaryDirectory() as work:
            result = hf_clip_parity(args.reward, args.size, work)
    result["seconds"] = round(time.time() - t0, 1)
    result["torch"] = torch.__version__
    print(json.dumps(result, indent=1))
    if args.results:
        existing = {}
        if os.path.exists(args.results):
            with open(args.results) as f:
                existing = json.load(f)
        existing[f"{result['reward']}_{result['size']}"] = result
        os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
        with open(args.results, "w") as f:
            json.dump(existing, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
