r"""Reward fine-tuning of Stable Diffusion 3 with LoRA in plain PyTorch + diffusers: VGG-Flow and DRaFT-K.

One update (equations cite docs/math.md of the flowkern notes as (M#)):

1. Roll out the LoRA model with our own Euler loop, no grad, keeping the latents x_0..x_N
   (diffusers convention: timestep = 1000 * sigma, x_next = x + (sigma_next - sigma) * noise_pred).
2. VGG-Flow matching (M16) on a few transitions (M22): the reward gradient at the one-step
   prediction x_hat1 = x - sigma * noise_pred (M6, M7), clipped per sample (M8), gives the target
   noise_base - beta * eta_t * g of the fine-tuned prediction (no value network: c_phi = 0).
3. DRaFT-K (M23, M35): -reward of the final image, backpropagated through the last K sampling steps.

The loss is matching_weight * (2) + draft_weight * (3), with AdamW on the LoRA parameters.
sd3_vggflow_unfused.py writes (2) and (3) by hand; sd3_vggflow_flowkern.py is the same file with
them replaced by two flowkern calls (examples/drop_in.diff). Either runs as

    python examples/sd3_vggflow_flowkern.py --model stabilityai/stable-diffusion-3-medium-diffusers \
        --steps 400 --dtype bfloat16 --reward my_rewards:aesthetic --output-dir lora-out
"""

from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Callable

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--model", required=True, help="SD3 pipeline: a local directory or a hub id")
    parser.add_argument("--steps", type=int, default=400, help="optimizer updates")
    parser.add_argument("--prompt", nargs="+", default=["a cat"], help="training prompts, cycled over the batch")
    parser.add_argument(
        "--reward",
        default="brightness",
        help="'brightness' (mean pixel value, a stand-in) or 'module:function', a differentiable callable "
        "mapping images [B, 3, H, W] in [0, 1] to rewards [B]",
    )
    parser.add_argument("--batch-size", type=int, default=2, help="trajectories per update")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels")
    parser.add_argument("--num-inference-steps", type=int, default=20, help="Euler steps N of the rollout")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale, same for base and LoRA")
    parser.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (alpha = rank) on to_q/k/v/out.0")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (weight decay 1e-2)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clip of the LoRA gradient norm")
    parser.add_argument("--beta", type=float, default=5e4, help="VGG-Flow beta = 1/lambda: reward strength")
    parser.add_argument("--eta", choices=("quad", "linear", "constant"), default="quad", help="eta_t: t^2, t or 1")
    parser.add_argument("--subsample", type=float, default=0.25, help="fraction of transitions matched per update")
    parser.add_argument("--matching-weight", type=float, default=1.0, help="weight of the VGG-Flow matching loss")
    parser.add_argument("--draft-k", type=int, default=1, help="DRaFT-K: sampling steps backpropagated")
    parser.add_argument("--draft-weight", type=float, default=0.1, help="weight of -reward (0 disables DRaFT)")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="frozen weights (LoRA: fp32)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0, help="seeds the LoRA init, the noise and the transitions")
    parser.add_argument("--output-dir", help="where to save the LoRA (pytorch_lora_weights.safetensors)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.num_inference_steps < 1:
        parser.error("--steps, --batch-size and --num-inference-steps must be >= 1")
    if not 1 <= args.draft_k <= args.num_inference_steps:
        parser.error(f"--draft-k must lie in [1, --num-inference-steps={args.num_inference_steps}]")
    if args.beta <= 0 or not 0 < args.subsample <= 1:
        parser.error("--beta must be > 0 and --subsample in (0, 1]")
    if args.matching_weight == 0 and args.draft_weight == 0:
        parser.error("--matching-weight and --draft-weight are both 0: nothing to train")
    return args


def load_reward(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if spec == "brightness":
        return lambda images: images.mean(dim=(1, 2, 3))
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"--reward must be 'brightness' or 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def predict_noise(transformer, latents, sigma, prompt_embeds, pooled_embeds, guidance_scale):
    """CFG noise prediction over one [2B] batch (uncond first), fp32 out."""
    latent_in = torch.cat([latents, latents]).to(transformer.dtype)
    timestep = (1000 * sigma).expand(latent_in.shape[0])  # diffusers: timestep = 1000 * sigma
    noise = transformer(
        hidden_states=latent_in,
        timestep=timestep,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled_embeds,
        return_dict=False,
    )[0].float()
    noise_uncond, noise_cond = noise.chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


def decode(vae, latents):
    """Latents -> images [B, 3, H, W] in [0, 1], differentiable."""
    shift = vae.config.shift_factor or 0.0
    images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def pick_transitions(num_steps, fraction, generator):
    """The last transition plus one random index per bin (M22), shared across the batch."""
    bins = max(1, round(fraction * num_steps))
    picks = [num_steps - 1]
    for k in range(bins):
        low, high = k * num_steps // bins, (k + 1) * num_steps // bins
        picks.append(max(1, int(torch.randint(low, high, (), generator=generator))))
    return picks


def train(pipe, reward_fn, args) -> dict:
    """Fine-tune ``pipe.transformer`` with a LoRA; returns the history, the last update's LoRA
    gradients (before clipping) and the LoRA weights before and after."""
    device = torch.device(args.device)
    pipe.to(device)
    transformer, vae = pipe.transformer, pipe.vae
    for module in (transformer, vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.requires_grad_(False)
    torch.manual_seed(args.seed)  # LoRA init
    transformer.add_adapter(
        LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_rank,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    cast_training_params(transformer, dtype=torch.float32)  # LoRA in fp32 under a bf16 base
    lora = [(name, p) for name, p in transformer.named_parameters() if p.requires_grad]
    params = [p for _, p in lora]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    prompts = [args.prompt[j % len(args.prompt)] for j in range(args.batch_size)]
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            negative_prompt="",
            do_classifier_free_guidance=True,
            max_sequence_length=args.max_sequence_length,
        )
    prompt_embeds = torch.cat([negative, embeds]).to(transformer.dtype)
    pooled_embeds = torch.cat([negative_pooled, pooled]).to(transformer.dtype)

    def noise_pred(latents, sigma):
        return predict_noise(transformer, latents, sigma, prompt_embeds, pooled_embeds, args.guidance_scale)

    def reward_and_grad(latents):
        latents = latents.detach().requires_grad_()
        with torch.enable_grad():
            reward = reward_fn(decode(vae, latents))
            (grad,) = torch.autograd.grad(reward.sum(), latents)
        return reward.detach(), grad

    pipe.scheduler.set_timesteps(args.num_inference_steps, device=device)
    sigmas = pipe.scheduler.sigmas.float()  # N+1 values, 1 -> 0
    N = len(sigmas) - 1
    side = args.resolution // pipe.vae_scale_factor
    shape = (args.batch_size, transformer.config.in_channels, side, side)
    noise_gen = torch.Generator(device).manual_seed(args.seed)
    pick_gen = torch.Generator().manual_seed(args.seed + 1)
    tau = 1.0  # reward-gradient clip (M8, M9)

    lora_initial = {name: p.detach().clone() for name, p in lora}
    history, grads = [], {}
    for step in range(args.steps):
        # ---- 1. rollout, no grad (current LoRA policy), states x_0..x_N
        x = torch.randn(shape, generator=noise_gen, device=device)
        states = [x]
        with torch.no_grad():
            for i in range(N):
                x = x + (sigmas[i + 1] - sigmas[i]) * noise_pred(x, sigmas[i])
                states.append(x)
        optimizer.zero_grad(set_to_none=True)

        # ---- 2. VGG-Flow matching loss (M16) on subsampled transitions (M22)
        loss_matching, norms = 0.0, []
        if args.matching_weight > 0:
            transitions = pick_transitions(N, args.subsample, pick_gen)
            for i in transitions:
                x_i, sigma = states[i], sigmas[i]
                noise_ft = noise_pred(x_i, sigma)  # with grad into the LoRA
                transformer.disable_adapters()
                try:
                    with torch.no_grad():
                        noise_base = noise_pred(x_i, sigma)
                finally:
                    transformer.enable_adapters()
                x_hat1 = x_i - sigma * noise_ft.detach()  # (M6): x + (1-t) v with t = 1 - sigma, v = -noise_pred
                _, g = reward_and_grad(x_hat1)  # (M7)
                norm = g.flatten(1).norm(dim=1)  # (M8) per-sample clip to tau
                g = g * (norm.clamp(max=tau) / norm.clamp(min=1e-12)).view(-1, *[1] * (g.dim() - 1))
                norms.append(norm)
                t = 1 - sigma  # paper time
                eta = {"quad": t * t, "linear": t, "constant": torch.ones_like(t)}[args.eta]
                target = noise_base - args.beta * eta * g  # (M16) with v = -noise_pred, c_phi = 0
                loss = (noise_ft - target).square().mean()
                (args.matching_weight * loss / len(transitions)).backward()
                loss_matching += loss.item() / len(transitions)
            tau = torch.quantile(torch.cat(norms), 0.8).item()  # (M9)

        # ---- 3. DRaFT-K (M23, M35): -reward through the last K steps, x_{N-K} held constant
        if args.draft_weight > 0:
            x = states[N - args.draft_k]
            for i in range(N - args.draft_k, N):  # ordinary autograd: K steps of activations stay alive
                x = x + (sigmas[i + 1] - sigmas[i]) * noise_pred(x, sigmas[i])
            reward = reward_fn(decode(vae, x))
            (-args.draft_weight * reward.mean()).backward()
            reward = reward.detach()
        else:
            with torch.no_grad():
                reward = reward_fn(decode(vae, states[-1]))

        if step == args.steps - 1:
            grads = {name: p.grad.detach().clone() for name, p in lora if p.grad is not None}
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
        optimizer.step()
        loss_draft = -args.draft_weight * reward.mean().item()
        record = dict(reward=reward.mean().item(), loss_matching=loss_matching, loss_draft=loss_draft)
        record.update(grad_norm=grad_norm, tau=tau)
        history.append(record)
        print(f"step {step + 1}/{args.steps} " + " ".join(f"{k} {v:.4g}" for k, v in record.items()), flush=True)
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient at step {step + 1}")

    lora_final = {name: p.detach().clone() for name, p in lora}
    result = dict(history=history, grads=grads, lora_initial=lora_initial, lora_final=lora_final)
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak GPU memory {result['peak_memory_gib']:.2f} GiB")
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    pipe = StableDiffusion3Pipeline.from_pretrained(args.model, torch_dtype=dtype)
    result = train(pipe, load_reward(args.reward), args)
    if args.output_dir:
        StableDiffusion3Pipeline.save_lora_weights(
            args.output_dir, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer)
        )
        print(f"saved the LoRA to {args.output_dir}")
    return result


if __name__ == "__main__":
    main()
