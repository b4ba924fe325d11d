"""The original reward implementations, built offline for parity checks (issue 18; docs/rewards.md).

Shared by tests/test_rewards_parity.py (reduced sizes) and benchmarks/rewards_parity.py (real sizes):

- `seeded_state`: deterministic random weights for a key -> shape layout (the same numbers in every
  environment with the same torch), `state_digest` to check that two environments built the same weights;
- `natural_images`: smooth / textured / edged synthetic RGB images (1/f spectrum, gradients, soft shapes);
- `import_open_clip` / `open_clip_model`: open-clip-torch's own `CLIP` class (HPSv2 / v2.1 are open_clip
  ViT-H-14 checkpoints);
- `imagereward_original`: the `image-reward` package's own `ImageReward` (BLIP ViT + med.py BERT + MLP);
- `clip_tokenizer_from_open_clip`: a transformers `CLIPTokenizer` written from open_clip's bundled BPE file,
  so real-size token ids can be compared without a download.

The originals need packages the project's environment cannot hold (docs/rewards.md, "Parity"): each import
helper returns None when its package is missing, and tests skip.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
from collections.abc import Mapping, Sequence

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def one_thread():
    """Tests importing this fixture run single-threaded (deterministic sums; the machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- seeded weights


def _std_for(key: str, shape: Sequence[int]) -> tuple[float, float]:
    """(mean, std) of the random init of one tensor, from its name and shape (fan-in scaled)."""
    if key.endswith("logit_scale"):
        return math.log(1 / 0.07), 0.0
    if len(shape) == 1:
        return (1.0, 0.1) if key.endswith("weight") else (0.0, 0.05)  # LayerNorm weights / biases
    if len(shape) == 0:
        return 0.0, 0.1
    if key.endswith(("visual.proj", "text_projection")) and not key.endswith(".weight"):
        return 0.0, 1.0 / math.sqrt(shape[0])  # open_clip's x @ proj matrices [in, out]
    if any(s in key for s in ("embedding", "embed", "cls_token")) and len(shape) != 4:
        return 0.0, 0.1
    return 0.0, 1.0 / math.sqrt(math.prod(shape[1:]))  # Linear [out, in] / conv [out, in, k, k]


def seeded_state(layout: Mapping[str, Sequence[int]], seed: int, dtype: torch.dtype = torch.float32):
    """A state dict with ``layout``'s keys and shapes: N(mean, std) per tensor (see `_std_for`), drawn in
    sorted key order from one seeded generator; keys ending ``position_ids`` get ``arange`` (BERT's buffer)."""
    return dict(_seeded_tensors(layout, seed, dtype))


def _seeded_tensors(layout: Mapping[str, Sequence[int]], seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    for key in sorted(layout):
        shape = tuple(int(s) for s in layout[key])
        if key.endswith("position_ids"):
            yield key, torch.arange(shape[-1]).expand(shape).clone()
            continue
        mean, std = _std_for(key, shape)
        yield key, (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)


@torch.no_grad()
def seed_module_(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Write `seeded_state` of ``module``'s own layout into it in place, one tensor at a time (no second copy
    of the weights; real sizes are GBs). Returns the module's state dict (views of its tensors)."""
    state = module.state_dict()
    for key, value in _seeded_tensors(layout_of(state), seed):
        state[key].copy_(value)
    return state


def layout_of(state: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted keys, shapes and fp32 bytes."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update((t.float() if t.is_floating_point() else t.long()).contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- tiny tokenizers (offline)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_clip_tokenizer():
    """CLIP BPE-style tokenizer (letters only) whose <|endoftext|> is the largest id, as in open_clip/OpenAI
    CLIP (eot = 49407 there): 54 ids."""
    from transformers import CLIPTokenizer

    vocab = {}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    end = "<|endoftext|>"
    return CLIPTokenizer(
        vocab=vocab, merges=[], unk_token=end, bos_token="<|startoftext|>", eos_token=end, pad_token=end,
        model_max_length=77,
    )  # fmt: skip


def tiny_bert_tokenizer():
    """bert-style WordPiece tokenizer plus BLIP's [DEC] / [ENC] tokens (BLIP's init_tokenizer): 37 ids."""
    import tempfile

    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS, "red", "cat", "blue", "sky"]
    with tempfile.TemporaryDirectory() as d:  # a vocab file: the constructor's form in transformers 4 and 5
        path = os.path.join(d, "vocab.txt")
        with open(path, "w") as f:
            f.write("\n".join(words) + "\n")
        tok = BertTokenizer(path)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def bert_base_shaped_tokenizer(directory: str | os.PathLike):
    """A WordPiece tokenizer with bert-base-uncased's size and special ids ([PAD] 0, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103; 30522 entries) + BLIP's [DEC] / [ENC] (30524), written to ``directory``; the
    words are a small English list plus fillers (the real vocab is a download)."""
    from transformers import BertTokenizer

    words = (
        "a an the of in on with and red blue green cat dog sky sea tree house car man woman photo painting "
        "portrait city night sunset mountain forest river flower bird girl boy old new small big"
    ).split()
    vocab = [f"[unused{i}]" for i in range(100)]
    vocab[0] = "[PAD]"
    vocab += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(LETTERS) + [w for w in words if w not in LETTERS]
    vocab += [f"##f{i}" for i in range(30522 - len(vocab))]
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizer(path)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.save_pretrained(directory)
    return tok


# ---------------------------------------------------------------- natural-looking images


def natural_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """[b, 3, h, w] float64 in [0, 1]: a 1/f ("pink") colour texture over a smooth two-colour gradient, with
    two soft-edged discs and a sharp-edged rectangle (object boundaries), plus faint sensor noise."""
    g = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(h, dtype=torch.float64).view(h, 1)
    fx = torch.fft.rfftfreq(w, dtype=torch.float64).view(1, -1)
    amp = 1.0 / torch.clamp(torch.sqrt(fx**2 + fy**2), min=1.0 / max(h, w))
    spec = torch.complex(torch.randn(b, 3, *amp.shape, generator=g, dtype=torch.float64),
                         torch.randn(b, 3, *amp.shape, generator=g, dtype=torch.float64)) * amp  # fmt: skip
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.8, 1.0, 0.8], [0.6, 0.8, 1.0]], dtype=torch.float64)
    tex = torch.einsum("cd,bdhw->bchw", mix, torch.fft.irfft2(spec, s=(h, w)))
    tex = tex / tex.flatten(1).std(1).view(b, 1, 1, 1)
    yy = torch.linspace(0, 1, h, dtype=torch.float64).view(1, 1, h, 1)
    xx = torch.linspace(0, 1, w, dtype=torch.float64).view(1, 1, 1, w)
    c0, c1 = (
        torch.rand(b, 3, 1, 1, generator=g, dtype=torch.float64),
        torch.rand(b, 3, 1, 1, generator=g, dtype=torch.float64),
    )
    t = (0.6 * yy + 0.4 * xx).clamp(0, 1)
    img = c0 * (1 - t) + c1 * t + 0.08 * tex
    for _ in range(2):  # soft discs
        cy, cx, r = torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1.0, 0.3]) + torch.tensor(
            [0, 0, 0.1]
        )
        d = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        alpha = torch.sigmoid((r - d) * 60)
        img = img * (1 - alpha) + torch.rand(b, 3, 1, 1, generator=g, dtype=torch.float64) * alpha
    y0, x0 = (torch.rand(2, generator=g, dtype=torch.float64) * 0.5).tolist()
    rect = ((yy > y0) & (yy < y0 + 0.35) & (xx > x0) & (xx < x0 + 0.4)).to(torch.float64)
    img = img * (1 - rect) + (0.5 * img + 0.5 * torch.rand(b, 3, 1, 1, generator=g, dtype=torch.float64)) * rect
    img = img + 0.01 * torch.randn(img.shape, generator=g, dtype=torch.float64)
    return img.clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- open_clip


def _import_torchvision() -> None:
    """PyPI's torchvision wheels are CUDA builds: next to a CPU-only torch their compiled ops do not load, and
    torchvision (0.28) then fails at import, registering a fake kernel for ``torchvision::nms``. On that error
    the two schemas it registers unconditionally are declared and the import retried (only the transforms
    are used here, no detection op). Nothing changes where torchvision imports."""
    import sys

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    global _TORCHVISION_FRAGMENT
    if _TORCHVISION_FRAGMENT is None:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_FRAGMENT = lib
    importlib.import_module("torchvision")


_TORCHVISION_FRAGMENT = None
_import_torchvision()  # before transformers' first vision import, which imports torchvision when it is installed


def import_open_clip():
    """The open_clip module, or None when open-clip-torch is not importable here."""
    if importlib.util.find_spec("open_clip") is None:
        return None
    _import_torchvision()
    try:
        return importlib.import_module("open_clip")
    except (ImportError, RuntimeError):
        return None


OPEN_CLIP_TINY = {  # ViT-H-14's structure (gelu, argmax pooling, projections) at reduced sizes
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 20, "vocab_size": 54, "width": 24, "heads": 3, "layers": 2},
}


def open_clip_config(name: str) -> dict:
    """``"tiny"`` (`OPEN_CLIP_TINY`) or an open_clip model config (``"ViT-H-14"``) read from the package."""
    if name == "tiny":
        return json.loads(json.dumps(OPEN_CLIP_TINY))
    open_clip = import_open_clip()
    if open_clip is None:
        raise RuntimeError("open-clip-torch is not importable")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"open_clip has no model config {name!r}")
    return cfg


def open_clip_model(config: Mapping, seed: int, quick_gelu: bool = False, dtype=torch.float32):
    """open_clip's own `CLIP` class with `seeded_state` weights (strict load), eval mode, and its state dict."""
    open_clip = import_open_clip()
    from open_clip.model import CLIP

    model = CLIP(**config, quick_gelu=quick_gelu)
    state = seed_module_(model, seed)
    del open_clip
    return model.to(dtype).eval().requires_grad_(False), state


def clip_tokenizer_from_open_clip(directory: str | os.PathLike):
    """A transformers `CLIPTokenizer` whose vocab/merges are built from open_clip's bundled BPE file (the
    same construction as open_clip's ``SimpleTokenizer``), saved into ``directory``; returns it."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    vocab_file, merges_file = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump({v: i for i, v in enumerate(vocab)}, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(vocab_file, merges_file, pad_token="!")  # laion's ViT-H-14 tokenizer pads with "!" (id 0)
    tok.save_pretrained(directory)
    return tok


# ---------------------------------------------------------------- ImageReward (image-reward package)

IMAGEREWARD_TINY = {
    "vision": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4},
    "med": {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "hidden_size": 24, "initializer_range": 0.02, "intermediate_size": 48,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 3,
        "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 40, "encoder_width": 32,
        "add_cross_attention": True,
    },
}  # fmt: skip
# THUDM/ImageReward's med_config.json (bert-base + cross-attention, vocab 30524 = bert + [DEC] + [ENC])
IMAGEREWARD_MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True,
}  # fmt: skip


def import_imagereward():
    """The ``ImageReward`` package (image-reward), or None when it does not import here."""
    if importlib.util.find_spec("ImageReward") is None:
        return None
    _import_torchvision()
    try:
        return importlib.import_module("ImageReward")
    except (ImportError, RuntimeError):
        return None


def imagereward_original(size: str, seed: int, med_config_path: str | os.PathLike, tokenizer):
    """The package's own `ImageReward` with `seeded_state` weights; ``size``: ``"real"`` (its constructor:
    BLIP ViT-L/16 at 224 px + bert-base with cross-attention) or ``"tiny"`` (its own VisionTransformer /
    BertModel / MLP classes at `IMAGEREWARD_TINY` sizes, assembled the way its constructor does).

    BLIP's ``init_tokenizer`` downloads bert-base-uncased; it is replaced by ``tokenizer`` (no network)."""
    ir = import_imagereward()
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.med import BertConfig, BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer

    ir_module = importlib.import_module("ImageReward.ImageReward")  # the module (the package re-exports the class)
    blip_pretrain.init_tokenizer = lambda: tokenizer
    if size == "real":
        model = ir_module.ImageReward(med_config=os.fspath(med_config_path), device="cpu")
    else:
        model = ir_module.ImageReward.__new__(ir_module.ImageReward)
        torch.nn.Module.__init__(model)
        model.device = "cpu"
        blip = torch.nn.Module()
        blip.visual_encoder = VisionTransformer(**IMAGEREWARD_TINY["vision"])
        blip.tokenizer = tokenizer
        config = BertConfig.from_json_file(os.fspath(med_config_path))
        config.encoder_width = IMAGEREWARD_TINY["vision"]["embed_dim"]
        blip.text_encoder = BertModel(config=config, add_pooling_layer=False)
        model.blip = blip
        model.mlp = ir_module.MLP(config.hidden_size)
        model.mean, model.std = 0.16717362830052426, 1.0333394966054072
    state = seed_module_(model, seed)
    del ir
    return model.eval().requires_grad_(False), state


def pixel_values(images: torch.Tensor, size: int) -> torch.Tensor:
    """The tensor preprocessing shared by both sides of a comparison (flowkern's, torchvision crop offset)."""
    from flowkern.rewards.preprocess import clip_preprocess

    return clip_preprocess(images, size, crop_offset="round")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


# ---------------------------------------------------------------- golden runs (original side) and flowkern side

PROMPTS = ("a red cat", "blue sky")
SIZES = {  # images (b, h, w) fed to both sides; the gap batch is scored through PIL and tensor preprocessing
    "tiny": {"images": (2, 47, 40), "gap": (4, 61, 52)},
    "real": {"images": (2, 256, 300), "gap": (8, 288, 352)},
}


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _pil_batch(images: torch.Tensor, transform) -> torch.Tensor:
    from PIL import Image

    u8 = to_uint8(images).permute(0, 2, 3, 1).numpy()
    return torch.stack([transform(Image.fromarray(a)) for a in u8])


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """n rows of t, cycling (prompt i % len(prompts) for image i)."""
    return t[torch.arange(n) % t.shape[0]]


def _score_and_grad(fn, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = images.detach().clone().requires_grad_(True)
    score = fn(x)
    (grad,) = torch.autograd.grad(score.sum(), x)
    return score.detach(), grad


def golden_run(reward: str, size: str, seed: int = 0, tokenizer_dir: str | os.PathLike | None = None):
    """Score images with the ORIGINAL package's model (seeded weights): -> (meta dict, tensors dict).

    tensors: ``images`` [b, 3, h, w] fp32 in [0, 1], ``scores``, ``grad`` (d sum(scores) / d images through
    the shared tensor preprocessing `pixel_values`), ``gap_scores_pil`` / ``gap_scores_tensor`` (the original
    model on the original's PIL preprocessing vs on `pixel_values`, same uint8 images). ``tokenizer_dir``
    (real sizes): where the real-size tokenizer is written for the flowkern side.
    """
    b, h, w = SIZES[size]["images"]
    images = natural_images(b, h, w, seed=seed + 1).float()
    gap_images = natural_images(*SIZES[size]["gap"], seed=seed + 2)
    gap_images = (to_uint8(gap_images).double() / 255).float()  # what the PIL path sees, exactly
    prompts = list(PROMPTS)
    meta = {"reward": reward, "size": size, "seed": seed, "prompts": prompts}
    if reward in ("hps", "aesthetic"):
        if reward == "hps":
            open_clip = import_open_clip()
            cfg = open_clip_config("tiny" if size == "tiny" else "ViT-H-14")
            model, state = open_clip_model(cfg, seed)
            image_size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
            vision_heads = cfg["vision_cfg"]["width"] // cfg["vision_cfg"].get("head_width", 64)
            text_heads = cfg["text_cfg"]["heads"]
            transform = open_clip.image_transform(image_size, is_train=False)
            meta.update(packages=_versions("open-clip-torch", "torch", "torchvision", "timm"), hidden_act="gelu")
        else:
            model, state, image_size, ctx, vision_heads, text_heads, transform = _openai_clip_aesthetic(size, seed)
            meta.update(packages=_versions("image-reward", "clip-anytorch", "torch", "torchvision"),
                        hidden_act="quick_gelu")  # fmt: skip
        meta.update(vision_heads=vision_heads, text_heads=text_heads, image_size=image_size)
        if reward == "hps":  # the aesthetic score reads no text
            if size == "tiny":
                tok = tiny_clip_tokenizer()
                ids = tok(prompts, padding="max_length", max_length=ctx, truncation=True, return_tensors="pt")
                ids = ids["input_ids"]
            else:
                ids = open_clip.tokenize(prompts, context_length=ctx)  # open_clip's own BPE: the reference ids
                clip_tokenizer_from_open_clip(tokenizer_dir)
            meta["input_ids"] = ids.tolist()
        if reward == "hps":

            def from_pixels(px):
                txt = model.encode_text(_rows(ids, px.shape[0]), normalize=True)
                img = model.encode_image(px, normalize=True)
                return (img * txt).sum(-1)  # hpsv2.score(): diag(image_features @ text_features.T)

        else:

            def from_pixels(px):
                return model.mlp(F.normalize(model.clip.encode_image(px))).squeeze(-1)  # AestheticScore.score

    elif reward == "imagereward":
        tok = tiny_bert_tokenizer() if size == "tiny" else bert_base_shaped_tokenizer(tokenizer_dir)
        med = dict(IMAGEREWARD_TINY["med"] if size == "tiny" else IMAGEREWARD_MED_CONFIG)
        import tempfile

        work = tokenizer_dir if tokenizer_dir is not None else tempfile.mkdtemp()
        os.makedirs(work, exist_ok=True)
        med_path = os.path.join(work, "med_config.json")
        with open(med_path, "w") as f:
            json.dump(med, f)
        model, state = imagereward_original(size, seed, med_path, tok)
        ir_module = importlib.import_module("ImageReward.ImageReward")
        image_size = 224 if size == "real" else IMAGEREWARD_TINY["vision"]["img_size"]
        transform = model.preprocess if size == "real" else ir_module._transform(image_size)
        enc = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        meta.update(packages=_versions("image-reward", "torch", "torchvision", "transformers", "timm", "fairscale"),
                    med_config=med, image_size=image_size, input_ids=enc["input_ids"].tolist(),
                    vision_heads=IMAGEREWARD_TINY["vision"]["num_heads"] if size == "tiny" else 16)  # fmt: skip

        def from_pixels(px):
            n = px.shape[0]
            return model.score_gard(_rows(enc["input_ids"], n), _rows(enc["attention_mask"], n), px).squeeze(-1)

    else:
        raise ValueError(f"unknown reward {reward!r}")
    meta.update(layout=layout_of(state), digest=state_digest(state))
    del state  # the model holds its copy (real sizes: GBs)
    scores, grad = _score_and_grad(lambda x: from_pixels(pixel_values(x, image_size)), images)
    with torch.no_grad():
        gap_pil = from_pixels(_pil_batch(gap_images, transform))
        gap_tensor = from_pixels(pixel_values(gap_images, image_size))
    tensors = {"images": images, "scores": scores, "grad": grad, "gap_scores_pil": gap_pil,
               "gap_scores_tensor": gap_tensor}  # fmt: skip
    return meta, {k: v.detach().float().contiguous() for k, v in tensors.items()}


def _openai_clip_aesthetic(size: str, seed: int):
    """OpenAI CLIP (the ``clip`` package, as ImageReward's AestheticScore loads it) + AestheticScore's MLP."""
    import clip as openai_clip
    from clip.model import CLIP as OpenAICLIP
    from ImageReward.models.AestheticScore import MLP

    # (embed, resolution, vision layers, vision width, patch, context, vocab, text width, text heads, text layers)
    args = (16, 32, 2, 64, 8, 20, 54, 24, 3, 2) if size == "tiny" else (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12)
    model = torch.nn.Module()
    model.clip, model.mlp = OpenAICLIP(*args), MLP(args[0])
    state = seed_module_(model, seed)
    model.eval().requires_grad_(False)
    transform = openai_clip.clip._transform(args[1])
    return model, state, args[1], args[5], args[3] // 64, args[8], transform


def save_golden(meta: Mapping, tensors: Mapping[str, torch.Tensor], path_stem: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    with open(f"{path_stem}.json", "w") as f:
        json.dump(meta, f)
    save_file(dict(tensors), f"{path_stem}.safetensors")


def load_golden(path_stem: str | os.PathLike):
    from safetensors.torch import load_file

    with open(f"{path_stem}.json") as f:
        meta = json.load(f)
    return meta, load_file(f"{path_stem}.safetensors")


def flowkern_reward_from_golden(meta: Mapping, work: str | os.PathLike, tokenizer_dir=None, **kwargs):
    """Regenerate the golden run's weights (checked by digest), save them in the ORIGINAL file format under
    ``work`` and load them through `flowkern.rewards.build_reward` from local paths."""
    from flowkern.rewards import build_reward

    state = seeded_state(meta["layout"], meta["seed"])
    if state_digest(state) != meta["digest"]:
        raise AssertionError("regenerated weights differ from the golden run's (torch RNG changed?)")
    os.makedirs(work, exist_ok=True)
    reward, size = meta["reward"], meta["size"]
    if tokenizer_dir is None:
        tokenizer_dir = os.path.join(work, "tokenizer")
        (tiny_bert_tokenizer() if reward == "imagereward" else tiny_clip_tokenizer()).save_pretrained(tokenizer_dir)
    if reward == "hps":
        path = os.path.join(work, "HPS_v2_compressed.pt")
        torch.save({"state_dict": state}, path)  # the released layout: open_clip state under 'state_dict'
        del state
        heads = {} if size == "real" else {"vision_heads": meta["vision_heads"], "text_heads": meta["text_heads"]}
        return build_reward("hpsv2", path, tokenizer=tokenizer_dir, **heads, **kwargs)
    if reward == "imagereward":
        path, med = os.path.join(work, "ImageReward.pt"), os.path.join(work, "med_config.json")
        torch.save(state, path)  # the released ImageReward.pt is a plain state dict
        del state
        with open(med, "w") as f:
            json.dump(meta["med_config"], f)
        heads = {} if size == "real" else {"vision_heads": meta["vision_heads"]}
        return build_reward("imagereward", path, med_config=med, tokenizer=tokenizer_dir, **heads, **kwargs)
    if reward == "aesthetic":
        from flowkern.rewards import clip_from_open_clip

        clip_state = {k.removeprefix("clip."): v for k, v in state.items() if k.startswith("clip.")}
        clip = clip_from_open_clip(clip_state, hidden_act="quick_gelu", vision_heads=meta["vision_heads"],
                                   text_heads=meta["text_heads"])  # fmt: skip
        clip.save_pretrained(os.path.join(work, "clip"))
        head = os.path.join(work, "sac+logos+ava1-l14-linearMSE.pth")
        torch.save({k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")}, head)
        return build_reward("aesthetic", os.path.join(work, "clip"), head, **kwargs)
    raise ValueError(f"unknown reward {reward!r}")


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max abs diff, and max abs diff relative to max |ref|; for vectors also the cosine."""
    ours, ref = ours.detach().double().flatten(), ref.detach().double().flatten()
    d = (ours - ref).abs().max().item()
    out = {"max_abs": d, "max_rel": d / max(ref.abs().max().item(), 1e-30), "ref_max": ref.abs().max().item()}
    if ref.numel() > 8:
        out["cosine"] = F.cosine_similarity(ours, ref, dim=0).item()
    return out


def flowkern_vs_golden(meta: Mapping, tensors: Mapping[str, torch.Tensor], reward) -> dict:
    """Score the golden images with a flowkern reward: score / gradient differences and token-id equality."""
    prompts = meta["prompts"]
    scores, grad = _score_and_grad(lambda x: reward(x, prompts), tensors["images"])
    out = {"score": compare(scores, tensors["scores"]), "grad": compare(grad, tensors["grad"])}
    if "input_ids" in meta and hasattr(reward, "tokenizer"):
        ids = torch.tensor(meta["input_ids"])
        ours = reward.tokenizer(prompts, padding="max_length", max_length=ids.shape[1], truncation=True,
                                return_tensors="pt")["input_ids"]  # fmt: skip
        out["token_ids_equal"] = bool(torch.equal(ours, ids))
    gap = (tensors["gap_scores_pil"] - tensors["gap_scores_tensor"]).double()
    spread = tensors["gap_scores_pil"].double().std().item()
    out["preprocessing_gap"] = {"max_abs": gap.abs().max().item(), "mean_abs": gap.abs().mean().item(),
                                "score_std_across_images": spread, "n_images": gap.numel()}  # fmt: skip
    return out


# ---------------------------------------------------------------- PickScore / CLIPScore vs transformers
# transformers CLIPConfig kwargs of the released models (laion ViT-H-14 for PickScore, OpenAI ViT-L/14)
HF_CLIP = {
    "pickscore": dict(
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         hidden_act="gelu", vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=0),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           patch_size=14, image_size=224, hidden_act="gelu"),
        projection_dim=1024,
    ),
    "clipscore": dict(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=1),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           patch_size=14, image_size=224, hidden_act="quick_gelu"),
        projection_dim=768,
    ),
    "tiny": dict(
        text_config=dict(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=3,
                         vocab_size=54, max_position_embeddings=20, bos_token_id=52, eos_token_id=53, pad_token_id=53),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           patch_size=8, image_size=32),
        projection_dim=16,
    ),
}  # fmt: skip


def hf_clip_parity(reward: str, size: str, work: str, tokenizer_dir: str | None = None, seed: int = 0) -> dict:
    """PickScore / CLIPScore through flowkern vs transformers' own `CLIPModel` code path (the model card's:
    ``get_image_features`` / ``get_text_features`` with ``padding=True``, normalise, ``logit_scale.exp() *``
    for PickScore), on the same tensor-preprocessed pixels; plus the gap of `CLIPImageProcessor` (PIL)."""
    import transformers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from flowkern.rewards import build_reward, clip_preprocess

    cfg = CLIPConfig(**HF_CLIP["tiny" if size == "tiny" else reward])
    model = CLIPModel(cfg)
    seed_module_(model, seed)
    model.eval().requires_grad_(False)
    directory = os.path.join(work, reward)
    model.save_pretrained(directory)
    if size == "tiny":
        tok = tiny_clip_tokenizer()
        tok.save_pretrained(directory)
    else:
        tok = clip_tokenizer_from_open_clip(tokenizer_dir or directory)
        tok.save_pretrained(directory)
    scale = model.logit_scale.exp() if reward == "pickscore" else 1.0
    ours = build_reward(reward, directory)
    image_size = cfg.vision_config.image_size
    text = tok(list(PROMPTS), padding=True, truncation=True, max_length=77, return_tensors="pt")

    def original(px):
        img = model.get_image_features(pixel_values=px)
        txt = model.get_text_features(**text)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        return scale * cosine(img, txt)

    b, h, w = SIZES[size]["images"]
    images = natural_images(b, h, w, seed=seed + 1).float()
    ref, ref_grad = _score_and_grad(lambda x: original(clip_preprocess(x, image_size)), images)
    got, got_grad = _score_and_grad(lambda x: ours(x, list(PROMPTS)), images)
    gap_images = (to_uint8(natural_images(*SIZES[size]["gap"], seed=seed + 2)).double() / 255).float()
    proc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    n = gap_images.shape[0]
    idx = torch.arange(n) % len(PROMPTS)
    text = {k: v[idx] for k, v in text.items()}
    with torch.no_grad():
        pil = original(_pil_batch(gap_images, lambda im: proc(images=im, return_tensors="pt")["pixel_values"][0]))
        tens = original(clip_preprocess(gap_images, image_size))
    gap = (pil - tens).double()
    return {
        "reward": reward, "size": size, "original": f"transformers {transformers.__version__} CLIPModel",
        "score": compare(got, ref), "grad": compare(got_grad, ref_grad),
        "preprocessing_gap": {"max_abs": gap.abs().max().item(), "mean_abs": gap.abs().mean().item(),
                              "score_std_across_images": pil.double().std().item(), "n_images": n},
    }  # fmt: skip
