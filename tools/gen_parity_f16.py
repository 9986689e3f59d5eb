#!/usr/bin/env python3
"""Record half-precision parity cases from diffusers/transformers (PyTorch runs fp16 on the
CPU): the same case formats as ../shared/fixtures/parity (see its README), each expected output
`<name>` in float32 with `tol.<name>` = max(10 x |float32 - float64|, 1e-6) as usual, plus
`f16.<name>` (the reference's own fp16 result) and `tol_f16.<name>` = max(10 x |fp16 - float64|,
1e-6): the bound for a port that computes in f16 (tests/parity.rs runs these cases in f16 too).

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch "diffusers==0.42.1" "transformers==5.23.0" pillow
    /tmp/ref/bin/python tools/gen_parity_f16.py --model ../shared/fixtures/tiny-ip2p --out tests/fixtures/parity
"""
import argparse
import copy
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
import diffusers
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

import gen_parity


def tol(a, b):
    return torch.tensor([max(10 * (a.double() - b.double()).abs().max().item(), 1e-6)], dtype=torch.float32)


def put(tensors, name, r32, r64, r16):
    tensors[name] = r32.float().contiguous()
    tensors[f"tol.{name}"] = tol(r32, r64)
    tensors[f"f16.{name}"] = r16.float().contiguous()
    tensors[f"tol_f16.{name}"] = tol(r16, r64)


def components(pipe, out):
    g = torch.Generator().manual_seed(7)
    ids = pipe.tokenizer(["a red rose in a field of snow"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    h, w = 64, 64
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    vae_in = torch.stack([xx, yy, (xx * yy)], 0)[None] * 0.9
    vae_z = torch.randn((1, 4, 8, 8), generator=g)
    sample = torch.randn((2, 8, 8, 8), generator=g)
    ehs = torch.randn((2, 77, 32), generator=g)
    t = 500
    res = {}
    for dt in (torch.float32, torch.float64, torch.float16):
        te = copy.deepcopy(pipe.text_encoder).to(dt)
        vae = copy.deepcopy(pipe.vae).to(dt)
        unet = copy.deepcopy(pipe.unet).to(dt)
        with torch.no_grad():
            r = {"text_hidden": te(ids).last_hidden_state}
            d = vae.encode(vae_in.to(dt)).latent_dist
            r["vae_mean"], r["vae_logvar"] = d.mean, d.logvar
            r["vae_decoded"] = vae.decode(vae_z.to(dt)).sample
            r["unet_out"] = unet(sample.to(dt), t, encoder_hidden_states=ehs.to(dt)).sample
        res[dt] = r
    tensors = {"input_ids": ids.to(torch.int64), "vae_in": vae_in, "vae_z": vae_z, "unet_sample": sample, "unet_ehs": ehs}
    for k in res[torch.float32]:
        put(tensors, k, res[torch.float32][k], res[torch.float64][k], res[torch.float16][k])
    meta = {"kind": "components", "unet_timestep": t, "generated_by": f"tools/gen_parity_f16.py, diffusers {diffusers.__version__}, torch {torch.__version__}"}
    save_file(tensors, os.path.join(out, "f16_components_64x64.safetensors"), metadata={k: json.dumps(v) for k, v in meta.items()})
    print("f16_components_64x64", {k: round(tensors[f"tol_f16.{k}"].item(), 6) for k in res[torch.float32]})


CASES = [
    # name, scheduler, overrides, steps, s_T, s_I, H, W, prompt, negative
    ("f16_ip2p_euler_a", "euler_a", {}, 4, 7.5, 1.5, 64, 64, "turn the sunflowers into roses", ""),
    ("f16_ip2p_euler_48x80", "euler", {}, 3, 6.0, 1.3, 48, 80, "make it night", "blurry"),
]


def pipelines(pipe, out):
    rng = np.random.default_rng(16)
    for name, sched, overrides, steps, s_t, s_i, h, w, prompt, negative in CASES:
        yy, xx = np.mgrid[0:h, 0:w]
        disc = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 4) ** 2)
        image = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), 128 + 100 * disc], -1)
        image = (image + rng.integers(0, 8, size=image.shape)).clip(0, 255).astype(np.uint8)
        from PIL import Image

        pil = Image.fromarray(image)
        init = torch.randn((1, 4, h // 8, w // 8), generator=torch.Generator().manual_seed(len(name)))
        cls = gen_parity.CLASSES[sched]
        args = (cls, overrides, steps, s_t, s_i, pil, prompt, negative, init)
        sch32, lat32, out32, noises = gen_parity.run(pipe, *args, None, torch.float32)
        _, lat64, out64, _ = gen_parity.run(pipe, *args, list(noises), torch.float64)
        # On a copy: casting the pipeline to fp16 and back would round its weights for later runs.
        _, lat16, out16, _ = gen_parity.run(copy.deepcopy(pipe), *args, list(noises), torch.float16)
        tensors = {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "init_latents": init.float().contiguous(),
            "timesteps": sch32.timesteps.float().contiguous(),
            "output_u8": torch.from_numpy(np.ascontiguousarray(np.round(out32.numpy() * 255).astype(np.uint8))),
        }
        put(tensors, "output_float", out32, out64, out16)
        for i, (a, b, c) in enumerate(zip(lat32, lat64, lat16)):
            put(tensors, f"latents.{i}", a, b, c)
        for i, n in enumerate(noises):
            tensors[f"noise.{i}"] = n.float().contiguous()
        cfg = {k: v for k, v in dict(sch32.config).items() if not k.startswith("_")}
        meta = {
            "kind": "ip2p", "prompt": prompt, "negative_prompt": negative, "steps": steps,
            "guidance_scale": s_t, "image_guidance_scale": s_i, "scheduler": sched, "scheduler_config": cfg,
            "generated_by": f"tools/gen_parity_f16.py, diffusers {diffusers.__version__}, torch {torch.__version__}",
        }
        save_file(tensors, os.path.join(out, name + ".safetensors"), metadata={k: json.dumps(v) for k, v in meta.items()})
        print(name, "tol.output_float", tensors["tol.output_float"].item(), "tol_f16.output_float", tensors["tol_f16.output_float"].item())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(args.model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    components(pipe, args.out)
    pipelines(pipe, args.out)


if __name__ == "__main__":
    main()
