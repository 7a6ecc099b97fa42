# Cross-check `selma generate` against diffusers on the same model folders and
# the same initial latents (deterministic samplers); writes the reference PNGs
# of host/crates/diffusion/tests/fixtures/diffusers-ref (see its README.md).
# Usage: python3 scripts/diffusers-ref.py DIR OUTDIR, where DIR holds tiny/, tinyxl/
# (selma model init --preset tiny|tiny-xl --seed 0), lat.safetensors and our
# ours-sd1.png, ours-sd1-dpm.png, ours-sd1-dpmk.png, ours-xl.png.
import sys, numpy as np, torch
from PIL import Image
from safetensors.torch import load_file
import diffusers
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline)
X, OUT = sys.argv[1], sys.argv[2]
print("diffusers", diffusers.__version__, "torch", torch.__version__)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
lat = load_file(f"{X}/lat.safetensors")["latents"]
def cmp(name, img, ours_png, dev):
    ref = (img * 255).round().clip(0, 255).astype(np.uint8)
    ours = np.array(Image.open(f"{X}/{ours_png}").convert("RGB"))
    d = np.abs(ref.astype(int) - ours.astype(int))
    print(f"{name} [{dev}]: max abs diff {d.max()} / 255, mean {d.mean():.4f}, differing {(d > 0).sum()}/{d.size}")
    if dev == "cuda":
        Image.fromarray(ref).save(f"{OUT}/ref-{name}.png")
P, N = "a red cube on a blue table", "blurry"
for dev in ["cpu", "cuda"]:
    sd = StableDiffusionPipeline.from_pretrained(f"{X}/tiny", torch_dtype=torch.float32, safety_checker=None,
                                                 requires_safety_checker=False).to(dev)
    base = sd.scheduler.config
    for name, cls, kw, png in [("ddim", DDIMScheduler, {}, "ours-sd1.png"),
                               ("dpm", DPMSolverMultistepScheduler, {}, "ours-sd1-dpm.png"),
                               ("dpm-karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, "ours-sd1-dpmk.png")]:
        sd.scheduler = cls.from_config(base, **kw)
        img = sd(P, negative_prompt=N, num_inference_steps=10, guidance_scale=7.5, latents=lat.to(dev),
                 height=64, width=64, eta=0.0, output_type="np").images[0]
        cmp(name, img, png, dev)
    xl = StableDiffusionXLPipeline.from_pretrained(f"{X}/tinyxl", torch_dtype=torch.float32).to(dev)
    img = xl(P, num_inference_steps=10, guidance_scale=5.0, latents=lat.to(dev), height=64, width=64,
             output_type="np").images[0]
    cmp("sdxl-euler", img, "ours-xl.png", dev)
