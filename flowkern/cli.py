"""The ``flowkern`` command: ``demo``, ``train``, ``eval``, ``plot``, ``bench`` (layer L6).

Bad input (unknown method or reward, a missing or damaged model directory, a corrupt or incompatible checkpoint,
an unwritable output directory, out-of-range numbers, a setting of the wrong type, a flag with no effect) and the
environment (a full disk, a run directory in use by another process, out of memory) end with one line on stderr,
``flowkern <command>: error: ...``, and exit status 2, leaving the run directory consistent (resumable). Unexpected
internal errors show their traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

EPILOG_TRAIN = """\
examples:
  flowkern train --model toy --reward bump --steps 200 --out runs/toy
  flowkern train --model tiny --method vggflow --reward redness --beta 300 --steps 100 --out runs/tiny
  flowkern train --model path/to/stable-diffusion-3.5-medium --prompt "a cat" --reward aesthetic \\
      --reward-source aesthetic=openai/clip-vit-large-patch14,aesthetic_head.pth --precision bf16 --out runs/sd3
  flowkern train --config run.json --steps 800          # flags override the file's values
  flowkern train --out runs/tiny --resume --steps 200   # continue bit-exactly from the last checkpoint
                                                        # (with the settings it recorded)
  accelerate launch --multi_gpu --num_processes 8 -m flowkern train ...   # data parallel, 8 GPUs

--config FILE is JSON: {"model": "tiny", "method": "dam", "reward": ["redness:1.0"], "beta": 300, ...}
(keys are the long flag names with '_' for '-'). Outputs: log.jsonl, checkpoints/, lora/, eval.json, plots."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``flowkern train: error: ...``) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


BASE_PRECISION = dict(  # train and eval: the frozen transformer's storage (flowkern.models.quantize)
    choices=("bf16", "int8", "fp8"),
    help="frozen transformer linears in bf16 or weight-only int8/fp8 (torchao); computes in bf16 [--precision]",
)

RECOMPUTE_CHOICES = ("none", "block", "sublayer")  # flowkern.models._adapter.RECOMPUTE (not imported: startup time)
PROMPT_CACHE_HELP = "cache the prompt embeddings here (a safetensors file per prompt and text encoder)"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' layout (paragraphs wrapped by :func:`_wrap`) and shows meaningful defaults only."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, [], argparse.SUPPRESS) or "[" in text:
            return text
        if isinstance(default, tuple):
            default = ",".join(default)
        return f"{text} [{default}]"


def _wrap(text: str, width: int = 100) -> str:
    """Wrap each paragraph of ``text``; lines starting with two spaces (lists) are kept as they are."""
    import textwrap

    out = []
    for para in text.split("\n\n"):
        lines = para.splitlines()
        if any(line.startswith("  ") for line in lines):
            out.append(para)
        else:
            out.append(textwrap.fill(" ".join(lines), width))
    return "\n\n".join(out)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _int_min(minimum: int, maximum: int = 2**31 - 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def _methods_list(text: str) -> tuple[str, ...]:
    from flowkern.app.build import METHODS

    if text.strip().lower() == "all":
        return tuple(METHODS)
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; known: {','.join(METHODS)}")
    return names


def _reward_source(text: str) -> tuple[str, list[str]]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH[,PATH...], got {text!r}")
    return name.strip().lower(), [v for v in value.split(",") if v]


def _build_parser() -> argparse.ArgumentParser:
    from flowkern.app.build import IMAGE_REWARDS, METHODS, TOY_REWARDS
    from flowkern.app.run import CHANGEABLE
    from flowkern.train.config import MAX_SEED

    seed = _int_min(0, MAX_SEED)

    parser = _Parser(
        prog="flowkern",
        description="Reward fine-tuning of flow-matching image models (VGG-Flow, adjoint matching, ReFL, DRaFT).",
        epilog="Start with `flowkern demo` (about 2 minutes on a laptop CPU). `flowkern COMMAND --help` for details.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    methods = "\n".join(f"  {name:8s} {entry.summary}" for name, entry in METHODS.items())

    # ------------------------------------------------------------ demo
    demo = sub.add_parser(
        "demo",
        help="align the built-in tiny model to a pixel reward and write a report folder",
        formatter_class=_Formatter,
        description=_wrap(
            "Load the tiny pixel-space SD3 transformer that ships with flowkern (16x16 RGB shapes, four "
            "prompts), add a LoRA and align it to a differentiable reward with VGG-Flow (and, with --methods, "
            "the other methods side by side). Writes reward_curve.png, samples.png (before/after), "
            "metrics.json (reward, diversity, prior preservation), log.jsonl and report.md.\n\nmethods:\n" + methods
        ),
    )
    demo.add_argument("--out", default="flowkern-demo", help="report folder (created; its files are replaced)")
    demo.add_argument(
        "--methods",
        type=_methods_list,
        default="vggflow",
        help="comma-separated, e.g. vggflow,dam,refl,draft,am, or all",
    )
    demo.add_argument("--steps", type=_int_min(1), default=60, help="updates per method")
    demo.add_argument("--batch-size", type=_int_min(1), default=8, help="trajectories per update")
    demo.add_argument("--num-steps", type=_int_min(1), default=10, help="Euler sampling steps")
    demo.add_argument("--reward", choices=IMAGE_REWARDS, default="redness", help="the reward to maximise")
    demo.add_argument("--eval-samples", type=_int_min(2), default=16, help="fixed-seed samples for the metrics")
    demo.add_argument("--seed", type=seed, default=0)
    demo.add_argument("--model", default="tiny", help="'tiny' (shipped) or a directory in its format")
    demo.add_argument("--threads", type=_int_min(1), default=1, help="torch CPU threads (the tiny model needs one)")
    demo.add_argument("--fast", action="store_true", help="a few tiny updates (the CI smoke test, ~10 s)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    # ------------------------------------------------------------ train
    train = sub.add_parser(
        "train",
        help="fine-tune a model (LoRA) toward reward(s) with one method",
        formatter_class=_Formatter,
        description=_wrap(
            "Fine-tune a flow model's LoRA toward one or more differentiable rewards.\n\nmethods:\n"
            + methods
            + f"\n\nrewards: {', '.join(IMAGE_REWARDS)} (pixel rewards, no weights), the model-based ones of "
            f"flowkern.rewards (need --reward-source), and {', '.join(TOY_REWARDS)} for --model toy."
        ),
        epilog=EPILOG_TRAIN,
    )
    S = argparse.SUPPRESS  # flags not given do not override --config values
    g = train.add_argument_group("model")
    g.add_argument("--model", default=S, help="'tiny' (built in), 'toy' (2-D), a diffusers directory or hub id [tiny]")
    g.add_argument("--prompt", action="append", default=S, help="a training prompt (repeatable; SD3)")
    g.add_argument("--prompts", metavar="FILE", default=S, help="a file of prompts, one per line")
    g.add_argument("--resolution", type=_int_min(1), default=S, help="image size in pixels [model's own]")
    g.add_argument("--precision", choices=("fp32", "bf16"), default=S, help="frozen weights' dtype [fp32]")
    g.add_argument("--base-precision", default=S, **BASE_PRECISION)
    g.add_argument("--prompt-cache", metavar="DIR", default=S, help=PROMPT_CACHE_HELP)
    g.add_argument("--device", default=S, help="cpu or cuda[:N] [cpu]")
    g.add_argument("--lora-rank", type=_int_min(1), default=S, help="LoRA rank [8]")
    g.add_argument("--lora-alpha", type=_positive_float, default=S, help="LoRA alpha [= rank]")
    g.add_argument("--num-steps", type=_int_min(1), default=S, help="Euler sampling steps [model's own, 20]")
    g.add_argument("--guidance-scale", type=_positive_float, default=S, help="CFG scale w [model's own]")
    g = train.add_argument_group("method and reward")
    g.add_argument("--method", default=S, help=f"one of {', '.join(METHODS)} [vggflow]")
    g.add_argument(
        "--reward",
        action="append",
        metavar="NAME[:WEIGHT]",
        default=S,
        help="reward and weight (repeatable: a weighted sum) [redness]",
    )
    g.add_argument(
        "--reward-source",
        action="append",
        type=_reward_source,
        metavar="NAME=PATH[,PATH]",
        default=S,
        help="weights of a model-based reward (local paths or hub ids)",
    )
    g.add_argument("--beta", type=_float, default=S, help="beta = 1/lambda > 0 [toy 2, tiny 600, real models 5e4]")
    g.add_argument("--lam", type=_float, default=S, help="lambda = 1/beta > 0 (instead of --beta)")
    g.add_argument(
        "--K", type=int, default=S, help="DAM trained steps / DRaFT backprop steps / ReFL last steps, 1..num-steps"
    )
    g.add_argument("--p", type=_float, default=S, help="DAM cost power > 1 [2]")
    g.add_argument("--eta", choices=("quad", "linear", "constant"), default=S, help="VGG-Flow eta_t [quad]")
    g.add_argument("--alpha", type=_float, default=S, help="VGG-Flow boundary weight [1e4]")
    g.add_argument("--subsample", type=_float, default=S, help="VGG-Flow transition fraction f in (0, 1] [0.25]")
    g.add_argument(
        "--consistency",
        choices=("fd", "exact"),
        default=S,
        help="VGG-Flow consistency residual: finite differences or JVP [fd; exact with bf16]",
    )
    g.add_argument(
        "--reward-hvp",
        choices=("autograd", "central"),
        default=S,
        help="VGG-Flow exact consistency's reward Hessian-vector product: double backward or central difference "
        "of two reward gradients [central for sd3/flux/flux2/sit; autograd]",
    )
    g = train.add_argument_group("optimisation")
    g.add_argument("--steps", type=_int_min(1), default=S, help="updates [400]")
    g.add_argument("--batch-size", type=_int_min(1), default=S, help="trajectories per micro-batch and process [8]")
    g.add_argument("--grad-accum", type=_int_min(1), default=S, help="micro-batches per update [1]")
    g.add_argument(
        "--micro-batch",
        type=_int_min(1),
        default=S,
        help="samples per forward/backward, VJP and reward gradient inside the loss (bounds peak memory) "
        "[1 for SD3/FLUX/SiT pipelines, all for tiny/toy]",
    )
    g.add_argument(
        "--memory-budget",
        default=S,
        help="GPU memory to fit, e.g. 24GB: `flowkern plan` picks the fastest knobs that fit (recompute granularity, "
        "trajectory offload, reward-tower checkpointing, batch x accumulation, K; real configs) and prints them",
    )
    g.add_argument(
        "--recompute",
        choices=RECOMPUTE_CHOICES,
        default=S,
        help="backbone recomputation in backward: none, per block, or per sublayer (attention / MLP; lower peak, "
        "~1 more forward of them) [block; SD3/FLUX/SiT pipelines]",
    )
    g.add_argument(
        "--checkpoint-reward",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="recompute each reward-tower layer (CLIP / BLIP) in backward: ~6x fewer reward-gradient activations [on]",
    )
    g.add_argument(
        "--offload-trajectory",
        action="store_true",
        default=S,
        help="keep the rollout's stored states in pinned CPU memory, copied back per use [off]",
    )
    g.add_argument("--lr", type=_positive_float, default=S, help="learning rate of the LoRA [5e-4]")
    g.add_argument("--value-lr", type=_positive_float, default=S, help="learning rate of the value net [= lr]")
    g.add_argument("--seed", type=seed, default=S, help="[0]")
    g = train.add_argument_group("run directory")
    g.add_argument("--out", default=S, help="run directory [runs/flowkern]")
    g.add_argument("--config", metavar="FILE", help="JSON file of settings; flags given here override it")
    g.add_argument(
        "--resume",
        action="store_true",
        default=S,
        help="continue from the run's newest checkpoint, with the settings recorded in it (flags given must match)",
    )
    g.add_argument(
        "--allow-change",
        action="append",
        choices=tuple(CHANGEABLE),
        metavar="NAME",
        default=S,
        help=f"with --resume: let this setting differ from the checkpoint's ({', '.join(CHANGEABLE)}; repeatable)",
    )
    g.add_argument(
        "--skip-damaged-checkpoint",
        action="store_true",
        default=S,
        help="with --resume: if the newest checkpoint is damaged, set it aside and resume from the previous one",
    )
    g.add_argument("--overwrite", action="store_true", default=S, help="replace an existing run in --out")
    g.add_argument(
        "--checkpoint-every", type=_int_min(0), default=S, help="updates between checkpoints, 0: end only [50]"
    )
    g.add_argument("--keep-checkpoints", type=_int_min(0), default=S, help="newest checkpoints kept, 0: all [2]")
    g.add_argument("--eval-samples", type=_int_min(2), default=S, help="fixed-seed samples of the final eval [16]")
    g.add_argument("--tensorboard", action="store_true", default=S, help="also log to RUN/tensorboard")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    # ------------------------------------------------------------ eval
    ev = sub.add_parser(
        "eval",
        help="score a saved LoRA against its base model on fixed seeds and prompts",
        formatter_class=_Formatter,
        description=_wrap(
            "Sample the base model with and without the LoRA from the same seeds and prompts; report "
            "reward(s), diversity (mean pairwise feature distance within a prompt) and prior preservation (mean "
            "distance to the base sample of the same seed and prompt). Writes JSON."
        ),
    )
    ev.add_argument("--lora", required=True, help="a LoRA directory (a run's lora/) or a run directory")
    ev.add_argument("--model", default="tiny", help="the base model: 'tiny', 'toy', a directory or hub id")
    ev.add_argument("--reward", action="append", metavar="NAME[:WEIGHT]", help="reward(s) to report [redness]")
    ev.add_argument("--reward-source", action="append", type=_reward_source, metavar="NAME=PATH[,PATH]", default=[])
    ev.add_argument("--prompt", action="append", default=[], help="prompt(s) (SD3)")
    ev.add_argument("--prompts", metavar="FILE", help="a file of prompts, one per line")
    ev.add_argument("--samples", type=_int_min(2), default=32, help="number of samples")
    ev.add_argument("--seed", type=seed, default=1234, help="noise seed")
    ev.add_argument("--num-steps", type=_int_min(1), help="Euler sampling steps [model's own]")
    ev.add_argument("--guidance-scale", type=_positive_float, help="CFG scale [model's own]")
    ev.add_argument("--resolution", type=_int_min(1))
    ev.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ev.add_argument("--base-precision", **BASE_PRECISION)
    ev.add_argument("--prompt-cache", metavar="DIR", help=PROMPT_CACHE_HELP)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", help="JSON file to write [stdout only]")

    # ------------------------------------------------------------ plot
    plot = sub.add_parser(
        "plot", help="redraw a run's reward/loss plots from its log.jsonl", formatter_class=_Formatter
    )
    plot.add_argument("run_dir", help="a run (or demo) directory with log.jsonl")

    # ------------------------------------------------------------ plan
    pl = sub.add_parser(
        "plan",
        help="predict the peak GPU memory of one training update (no weights, no GPU)",
        formatter_class=_Formatter,
        description=_wrap(
            "Runs one update of the real training code on fake tensors (shapes only) and reports its peak memory "
            "by phase and by kind. MODEL: a shipped config (sd3-medium, sd3.5-large, flux1-dev, flux2-klein-4b, "
            "sit-xl-2) or a local diffusers pipeline directory. With --memory-budget, picks the fastest knobs "
            "that fit (gradient checkpointing, trajectory offload, batch with accumulation, K, then an int8 / fp8 "
            "frozen base where torchao is installed) or names the smallest budget that would."
        ),
    )
    pl.add_argument("model", help="config name or pipeline directory")
    pl.add_argument("--method", default="dam", choices=["vggflow", "dam", "am", "draft", "refl"], help="[dam]")
    pl.add_argument("--K", type=_int_min(1), default=None, help="DAM / DRaFT / ReFL steps")
    pl.add_argument("--consistency", choices=["fd", "exact"], default=None, help="VGG-Flow's consistency terms")
    pl.add_argument(
        "--reward-hvp", choices=["autograd", "central"], default=None,
        help="VGG-Flow exact consistency's reward Hessian-vector product [central for real pipelines]",
    )  # fmt: skip
    pl.add_argument("--lora-rank", type=_int_min(1), default=None, help="[8, as flowkern train]")
    pl.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="frozen weights [bf16]")
    pl.add_argument("--base-precision", **BASE_PRECISION)
    pl.add_argument("--batch-size", type=_int_min(1), default=1, help="trajectories per micro-batch [1]")
    pl.add_argument("--grad-accum", type=_int_min(1), default=1, help="micro-batches per update [1]")
    pl.add_argument("--micro-batch", type=_int_min(1), default=1, help="samples per graph inside the loss [1]")
    pl.add_argument("--resolution", type=int, default=None, help="image side in pixels [the model's]")
    pl.add_argument("--num-steps", type=_int_min(1), default=None, help="Euler steps N [20]")
    pl.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="allocator to model [cuda]")
    pl.add_argument("--memory-budget", default=None, help="e.g. 24GB (10^9 bytes) or 24GiB: choose knobs that fit")
    pl.add_argument("--recompute", choices=RECOMPUTE_CHOICES, default="block", help="backbone recomputation [block]")
    pl.add_argument(
        "--checkpoint-reward", action=argparse.BooleanOptionalAction, default=True, help="reward-tower layers [on]"
    )
    pl.add_argument("--offload-trajectory", action="store_true", help="stored states in pinned CPU memory [off]")
    pl.add_argument(
        "--reward",
        choices=["redness", "brightness", "aesthetic"],
        default="redness",
        help="a pixel reward, or the aesthetic reward's CLIP ViT-L/14 tower built from its config [redness]",
    )
    pl.add_argument("--json", action="store_true", help="print the prediction as JSON")
    pl.add_argument(
        "--no-extrapolate", dest="extrapolate", action="store_false",
        help="trace the full depth [traces of 2 and 3 blocks, extrapolated]: minutes for a real config",
    )  # fmt: skip

    # ------------------------------------------------------------ bench
    bench = sub.add_parser(
        "bench",
        help="run the op benchmarks (pytest benchmarks -k FILTER)",
        formatter_class=_Formatter,
        description=_wrap(
            "A thin wrapper: `python -m pytest benchmarks -k FILTER [PYTEST_ARGS...]` in the repository. "
            "Needs a source checkout (the benchmarks are not installed with the package)."
        ),
    )
    bench.add_argument("-k", dest="filter", default=None, help="pytest -k expression, e.g. 'vggflow and cpp'")
    bench.add_argument("--dir", default=None, help="benchmarks directory [the checkout's benchmarks/]")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER, help="more pytest arguments (after --)")
    return parser


# ---------------------------------------------------------------- commands
def _read_prompts(path: str | None) -> list[str]:
    if path is None:
        return []
    try:
        with open(path) as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as err:
        raise ValueError(f"cannot read --prompts file {path}: {err.strerror}") from None
    if not prompts:
        raise ValueError(f"--prompts file {path} holds no prompts")
    return prompts


def _load_config(path: str) -> dict:
    from flowkern.app.run import TrainOptions

    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as err:
        raise ValueError(f"cannot read --config file {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--config file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config file {path} must hold a JSON object of settings")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    data.pop("num_processes", None)  # recorded in a run's run_config.json; set by the launcher, not a setting
    known = set(TrainOptions.__dataclass_fields__) | {"prompts"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config file {path}: unknown setting(s) {unknown}")
    if "prompts" in data and not isinstance(data["prompts"], str):
        raise ValueError(f"--config file {path}: prompts must be a file name (a string), got {data['prompts']!r}")
    return data  # types are checked by TrainOptions.check


def _cmd_train(args: argparse.Namespace) -> int:
    from flowkern.app.run import TrainOptions, saved_options, train_run

    values = _load_config(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "no_progress", "handler")}
    if "reward_source" in given:  # from flags: [(name, [paths])]
        given["reward_source"] = {name: paths for name, paths in given["reward_source"]}
    values.update(given)
    prompts = _read_prompts(values.pop("prompts", None))
    if prompts:
        prompt = values.get("prompt") or []
        values["prompt"] = ([prompt] if isinstance(prompt, str) else prompt) + prompts
    if values.get("resume") is True:  # the run's recorded settings; what is given here must match them
        skip = bool(values.get("skip_damaged_checkpoint"))
        saved, _ = saved_options(values.get("out", TrainOptions.out), skip_damaged=skip)
        values = {**saved, **values}
    opts = TrainOptions(**values)
    opts.progress = opts.progress and not args.no_progress
    train_run(opts)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from flowkern.app.demo import DemoOptions, run_demo

    opts = DemoOptions(
        out=args.out,
        model=args.model,
        threads=args.threads,
        methods=args.methods,
        steps=args.steps,
        batch_size=args.batch_size,
        num_steps=args.num_steps,
        reward=args.reward,
        eval_samples=args.eval_samples,
        seed=args.seed,
        fast=args.fast,
        progress=not args.no_progress,
    )
    run_demo(opts)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from flowkern.app.build import load_model, reward_for_run
    from flowkern.app.evaluate import evaluate_samples, generate
    from flowkern.app.run import ensure_output_dir

    lora = args.lora
    if not os.path.exists(lora):
        raise FileNotFoundError(f"--lora {lora} does not exist")
    if os.path.isdir(os.path.join(lora, "lora")):  # a run directory
        lora = os.path.join(lora, "lora")
    if args.out:
        parent = os.path.dirname(os.path.abspath(args.out))
        if os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a directory; give a JSON file name")
        ensure_output_dir(parent, allow_existing=True)
    prompts = list(args.prompt) + _read_prompts(args.prompts)
    setup = load_model(
        args.model,
        lora_path=lora,
        precision=args.precision,
        base_precision=args.base_precision,
        prompt_cache=args.prompt_cache,
        device=args.device,
        resolution=args.resolution,
        prompts=prompts,
        guidance_scale=args.guidance_scale,
        num_steps=args.num_steps,
    )
    rewards = args.reward or (["bump"] if setup.kind == "toy" else ["redness"])
    reward_fn, reward_module = reward_for_run(rewards, setup, {n: p for n, p in args.reward_source})
    tuned = generate(setup, args.samples, seed=args.seed)
    base = generate(setup, args.samples, seed=args.seed, base=True)
    result = {
        "model": setup.source,
        "lora": os.path.abspath(lora),
        "rewards": rewards,
        "seed": args.seed,
        "samples": args.samples,
        "prompts": setup.prompts,
        "tuned": evaluate_samples(setup, reward_fn, tuned, base, reward_module),
        "base": evaluate_samples(setup, reward_fn, base, None, reward_module),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from flowkern.app.report import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _plan_knobs(args: argparse.Namespace) -> dict:
    """The planner's knobs (flowkern.app.plan_models.Knobs fields) of `flowkern plan`'s flags."""
    from flowkern.models.lora import DEFAULT_RANK

    return dict(
        method=args.method, K=args.K, consistency=args.consistency, lora_rank=args.lora_rank or DEFAULT_RANK,
        precision=args.precision, batch=args.batch_size, grad_accum=args.grad_accum, micro_batch=args.micro_batch,
        resolution=args.resolution, num_steps=args.num_steps, base_precision=args.base_precision,
        extrapolate=args.extrapolate, recompute=args.recompute, checkpoint_reward=args.checkpoint_reward,
        offload_trajectory=args.offload_trajectory, reward=args.reward, reward_hvp=args.reward_hvp,
    )  # fmt: skip


def _cmd_plan(args: argparse.Namespace) -> int:
    from flowkern.app.plan import choose, format_table, knob_line, parse_budget, plan
    from flowkern.app.plan_models import resolve

    budget = parse_budget(args.memory_budget) if args.memory_budget is not None else None
    resolve(args.model)  # an unknown name or directory: one line before any work
    knobs = _plan_knobs(args)
    if budget is None:
        result = plan(args.model, device=args.device, **knobs)
        print(json.dumps(result, indent=1) if args.json else format_table(result))
        return 0
    chosen = choose(args.model, budget, device=args.device, **knobs)
    if args.json:
        print(json.dumps(chosen, indent=1))
    else:
        print(f"fits {budget / 2**30:.1f} GiB with: {chosen['choice']}: {knob_line(chosen['prediction']['knobs'])}")
        print(format_table(chosen["prediction"]))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = args.dir or os.path.join(root, "benchmarks")
    if not os.path.isdir(bench_dir):
        raise FileNotFoundError(
            f"benchmarks directory {bench_dir} not found (run from a source checkout or pass --dir)"
        )
    extra = [a for a in args.pytest_args if a != "--"]
    cmd = [sys.executable, "-m", "pytest", bench_dir, *(["-k", args.filter] if args.filter else []), *extra]
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=os.path.dirname(bench_dir))


COMMANDS = {
    "train": _cmd_train,
    "demo": _cmd_demo,
    "eval": _cmd_eval,
    "plot": _cmd_plot,
    "bench": _cmd_bench,
    "plan": _cmd_plan,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowkern`` console script; returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line already printed)
        return int(exc.code or 0)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as err:  # bad input, or the environment (files, a full disk, a busy run directory)
        return _one_line(args.command, str(err))
    except MemoryError as err:
        return _one_line(args.command, f"out of memory ({err}): lower --batch-size or --eval-samples")
    except RuntimeError as err:
        if "can't allocate memory" in str(err) or isinstance(err, _out_of_memory_error()):
            return _one_line(args.command, f"out of memory ({err}): lower --batch-size or --eval-samples")
        raise  # an internal error: the traceback is the report
    except Exception as err:
        if type(err).__name__ == "SafetensorError" and "os error" in str(err):  # a write failed (disk full)
            return _one_line(args.command, str(err))
        raise
    except KeyboardInterrupt:
        hint = " (the checkpoints written so far are intact: continue with --resume)" if args.command == "train" else ""
        print(f"flowkern {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


def _one_line(command: str, message: str) -> int:
    print(f"flowkern {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _out_of_memory_error() -> type:
    import torch

    return getattr(torch, "OutOfMemoryError", MemoryError)
