#!/usr/bin/env python3
"""PyTorch reference for selma's `train_step` bench (a dev tool, not a
project dependency): one LoRA training step (forward + backward of the
epsilon-MSE diffusion loss, batch 1, f32, CPU) on diffusers'
UNet2DConditionModel with random weights, LoRA from peft on
to_q, to_k, to_v, to_out.0 (rank r, alpha r, as selma's defaults).

Needs torch, diffusers, peft in a venv outside the repo, e.g.
  python3 -m venv /work/.venv-bench
  /work/.venv-bench/bin/pip install torch diffusers peft transformers
Run:
  /work/.venv-bench/bin/python scripts/bench/torch_train_step.py \
      --unet-config MODEL/unet/config.json --res 128 --rank 4 --iters 5 --threads 2
Prints one `step_s <seconds>` line per timed step, then medians and the
peak RSS (ru_maxrss) of this process.
"""

import argparse
import json
import resource
import statistics
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--unet-config", help="diffusers unet/config.json (default: SD 1.5)")
    p.add_argument("--res", type=int, default=128, help="image resolution (latents res/8)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--targets", default="to_q,to_k,to_v,to_out.0", help="comma-separated peft target modules"
    )
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = SD15_UNET
    if a.unet_config:
        with open(a.unet_config) as f:
            cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(cfg)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=a.rank,
            lora_alpha=a.rank,
            init_lora_weights="gaussian",
            target_modules=a.targets.split(","),
        )
    )
    unet.train()
    lora = [p for p in unet.parameters() if p.requires_grad]
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)

    h = a.res // 8
    c = unet.config.in_channels
    latents = torch.randn(1, c, h, h)
    noise = torch.randn(1, c, h, h)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    t = torch.tensor([500])

    def step():
        c0 = time.process_time()
        t0 = time.perf_counter()
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        t1 = time.perf_counter()
        loss.backward()
        assert all(p.grad is not None for p in lora), "missing LoRA gradients"
        for p in lora:
            p.grad = None
        t2 = time.perf_counter()
        return t2 - t0, t1 - t0, time.process_time() - c0

    print(
        f"torch {torch.__version__} | {a.res}x{a.res} px, batch 1, rank {a.rank}, "
        f"{len(lora) // 2} LoRA layers, f32 CPU, {a.threads} threads, {a.iters} iters",
        flush=True,
    )
    step()  # warm-up
    times, fwd, cpu = [], [], []
    for _ in range(a.iters):
        s, f, c = step()
        times.append(s)
        fwd.append(f)
        cpu.append(c)
        print(f"step_s {s:.4f} cpu_s {c:.2f}", flush=True)
    print(f"torch median {statistics.median(times):.4f} s  min {min(times):.4f} s")
    print(f"  forward part: median {statistics.median(fwd):.4f} s (the rest is backward)")
    print(f"  process CPU time per step: median {statistics.median(cpu):.2f} s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
