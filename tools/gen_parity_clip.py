#!/usr/bin/env python3
"""Record CLIP parity cases (kind "clip", as ../shared/fixtures/parity/clip_filter) that also
carry the raw images, so the preprocessing (Pillow bicubic shortest-edge resize, centre crop,
CLIP mean/std) is checked too: `images` uint8 [2, H, W, 3] -> `pixel_values`.

    /tmp/ref/bin/python tools/gen_parity_clip.py --model ../shared/fixtures/tiny-clip --out tests/fixtures/parity
"""
import argparse
import json
import os

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

CASES = [
    # name, H, W, captions
    ("clip_preprocess_45x70", 45, 70, ["a red house by a lake", "a blue house by a lake"]),
    ("clip_preprocess_300x200", 300, 200, ["a dog on the grass", "a dog on the snow, at night"]),
]


def picture(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 4) ** 2)
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), 60 + 150 * disc], -1)
    return (img + rng.integers(0, 40, size=img.shape)).clip(0, 255).astype(np.uint8)


def sims(img, txt):
    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return torch.stack([cos(img[0], txt[0]), cos(img[1], txt[1]), cos(img[1] - img[0], txt[1] - txt[0]), cos(img[0], img[1])])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    proc = CLIPImageProcessorPil.from_pretrained(args.model)
    tok = CLIPTokenizer.from_pretrained(args.model)
    m32 = CLIPModel.from_pretrained(args.model).eval()
    m64 = CLIPModel.from_pretrained(args.model).double().eval()
    for k, (name, h, w, captions) in enumerate(CASES):
        images = np.stack([picture(h, w, 2 * k), picture(h, w, 2 * k + 1)])
        pv = torch.from_numpy(proc(images=[Image.fromarray(i) for i in images], return_tensors="np")["pixel_values"])
        ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
        out = {}
        with torch.no_grad():
            for tag, m, dt in (("32", m32, torch.float32), ("64", m64, torch.float64)):
                ie = m.get_image_features(pixel_values=pv.to(dt))
                te = m.get_text_features(input_ids=ids)
                ie = getattr(ie, "pooler_output", ie)
                te = getattr(te, "pooler_output", te)
                ie = ie / ie.norm(dim=-1, keepdim=True)
                te = te / te.norm(dim=-1, keepdim=True)
                out[tag] = (ie, te, sims(ie, te))

        def tol(a, b):
            return torch.tensor([max(10 * (a.double() - b.double()).abs().max().item(), 1e-6)], dtype=torch.float32)

        tensors = {
            "images": torch.from_numpy(images),
            "pixel_values": pv.float().contiguous(),
            "tol.pixel_values": torch.tensor([1e-6]),
            "input_ids": ids.long(),
        }
        for i, key in enumerate(["image_embeds", "text_embeds", "similarities"]):
            tensors[key] = out["32"][i].float().contiguous()
            tensors["tol." + key] = tol(out["32"][i], out["64"][i])
        meta = {
            "kind": "clip",
            "captions": captions,
            "similarities_order": ["image0_caption0", "image1_caption1", "direction", "image0_image1"],
            "generated_by": f"tools/gen_parity_clip.py, transformers {transformers.__version__}, torch {torch.__version__}",
        }
        save_file(tensors, os.path.join(args.out, name + ".safetensors"), metadata={k: json.dumps(v) for k, v in meta.items()})
        print(name, {k: v.item() for k, v in tensors.items() if k.startswith("tol.")})


if __name__ == "__main__":
    main()
