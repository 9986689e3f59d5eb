#!/usr/bin/env python3
"""One step of diffusers' `examples/textual_inversion/textual_inversion.py` on tiny-sd: the new
token `<my-toy>` added to the tokenizer and initialised from "toy"'s row, "a photo of a <my-toy>"
encoded, the UNet's ε-prediction on DDPM-noised latents at one timestep, the MSE loss and its
gradient on the new row of the embedding table. Recorded in float32 and float64; each bound is
ten times their distance (as every parity case).

    /tmp/ref/bin/python tools/gen_ti_step.py   # writes tests/fixtures/textual-inversion/
"""
import os

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "../shared/fixtures/tiny-sd")
OUT = os.path.join(ROOT, "tests/fixtures/textual-inversion")


def step(dtype, latents, noise, t):
    tok = CLIPTokenizer.from_pretrained(TINY, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(TINY, subfolder="text_encoder").to(dtype)
    unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet").to(dtype)
    sched = DDPMScheduler.from_pretrained(TINY, subfolder="scheduler")
    tok.add_tokens(["<my-toy>"])
    init_id = tok.encode("toy", add_special_tokens=False)
    assert len(init_id) == 1
    new_id = tok.convert_tokens_to_ids(["<my-toy>"])[0]
    te.resize_token_embeddings(len(tok))
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        emb[new_id] = emb[init_id[0]].clone()
    ids = tok("a photo of a <my-toy>", padding="max_length", truncation=True,
              max_length=tok.model_max_length, return_tensors="pt").input_ids
    noisy = sched.add_noise(latents.to(dtype), noise.to(dtype), torch.tensor([t]))
    ehs = te(ids)[0]
    pred = unet(noisy, torch.tensor([t]), ehs).sample
    loss = F.mse_loss(pred.float() if dtype == torch.float32 else pred, noise.to(pred.dtype), reduction="mean")
    loss.backward()
    return ids, new_id, emb[new_id].detach().clone(), loss.detach(), emb.grad[new_id].clone()


def main():
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    t = 420
    ids, new_id, init, loss32, grad32 = step(torch.float32, latents, noise, t)
    _, _, _, loss64, grad64 = step(torch.float64, latents, noise, t)
    tol = lambda a, b: torch.tensor([max(10 * (a.double() - b).abs().max().item(), 1e-6)], dtype=torch.float32)
    os.makedirs(OUT, exist_ok=True)
    save_file({"input_ids": ids, "latents": latents, "noise": noise, "init_row": init.float().contiguous(),
               "loss": loss32.reshape(1).float(), "grad_row": grad32.float().contiguous(),
               "tol.loss": tol(loss32, loss64), "tol.grad_row": tol(grad32, grad64)},
              f"{OUT}/tiny-sd-step.safetensors",
              metadata={"timestep": str(t), "token": "<my-toy>", "initializer": "toy",
                        "new_id": str(new_id), "prompt": "a photo of a <my-toy>"})
    print(f"loss {loss32.item():.6f}, |grad| {grad32.norm():.3e}, tol {tol(grad32, grad64).item():.2e}")


if __name__ == "__main__":
    main()
