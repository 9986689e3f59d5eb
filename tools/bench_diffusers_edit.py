#!/usr/bin/env python3
"""diffusers' side of the whole-edit figure: StableDiffusionInstructPix2PixPipeline at full
SD 1.5 shapes (../shared/fixtures/sd15-shapes) with random weights, one `--steps`-step edit of a
res x res image, PyTorch on 2 threads, fp32. Prints one JSON line (median seconds, the
process's peak RSS). Run one resolution per process for a clean peak RSS.

    /tmp/ref/bin/python tools/bench_diffusers_edit.py --res 256 --steps 20 --reps 1
"""
import argparse
import json
import os
import resource
import statistics
import time

import numpy as np
import torch
from PIL import Image
from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler,
                       StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

torch.set_num_threads(2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(ROOT, "../shared"))
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=1)
    a = ap.parse_args()
    shapes = os.path.join(a.shared, "fixtures/sd15-shapes")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(shapes, "unet")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(shapes, "vae")))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(shapes, "text_encoder")))
    tok = CLIPTokenizer.from_pretrained(os.path.join(a.shared, "fixtures/clip-tokenizer"))
    sched = EulerAncestralDiscreteScheduler.from_pretrained(os.path.join(shapes, "scheduler"))
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae.eval(), text_encoder=te.eval(), tokenizer=tok, unet=unet.eval(), scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    x, y = np.meshgrid(np.arange(a.res), np.arange(a.res))
    img = Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8))
    times = []
    with torch.inference_mode():
        for _ in range(max(a.reps, 1)):
            t = time.perf_counter()
            pipe("turn the sunflowers into roses", image=img, num_inference_steps=a.steps,
                 guidance_scale=7.5, image_guidance_scale=1.5,
                 generator=torch.Generator().manual_seed(0))
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"component": "edit", "res": a.res, "steps": a.steps,
                      "s": statistics.median(times), "peak_rss_bytes": peak}), flush=True)


if __name__ == "__main__":
    main()
