#!/usr/bin/env python3
"""Writes tiny-ip2p (../shared/fixtures) as single-file checkpoints in the original LDM layout —
`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*` — the way
the original InstructPix2Pix release (`instruct-pix2pix-00-22000.ckpt`) and A1111/ComfyUI
files are laid out, then checks that diffusers' own converters (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`) map every tensor back to the
folder's, exactly. The UNet's EMA copy (`model_ema.*`, flattened names) holds the folder's
weights and the training copy is perturbed, so a converter that prefers EMA (as diffusers'
`extract_ema=True`) gets the folder back.

    /tmp/ref/bin/python tools/gen_single_file.py   # writes tests/fixtures/single-file/
"""
import os
import re

import torch
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "../shared/fixtures/tiny-ip2p")
OUT = os.path.join(ROOT, "tests/fixtures/single-file")

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
          ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
          ("conv_shortcut", "skip_connection")]


def unet_to_ldm(k, lpb, attn_levels_up):
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for d, l in fixed.items():
        if k.startswith(d + "."):
            return l + k[len(d):]
    def res(rest):
        for d, l in RESNET:
            if rest.startswith(d + "."):
                return l + rest[len(d):]
        raise KeyError(rest)
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + b * (lpb + 1) + l
        return f"input_blocks.{i}.0.{res(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{res(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = b * (lpb + 1) + l
        return f"output_blocks.{i}.0.{res(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)
    if m:
        b = int(m[1])
        i = b * (lpb + 1) + lpb
        return f"output_blocks.{i}.{2 if b in attn_levels_up else 1}.conv.{m[2]}"
    raise KeyError(k)


def new_attention_names(k):
    """The VAE's attention under today's names (older folders say query/key/value/proj_attn)."""
    return (k.replace("query.", "to_q.").replace("key.", "to_k.").replace("value.", "to_v.")
            .replace("proj_attn.", "to_out.0."))


def vae_to_ldm(k, n_up):
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", k)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", k)
    if m:
        rest = new_attention_names(m[2])
        rest = (rest.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k")
                .replace("to_v", "v").replace("to_out.0", "proj_out"))
        return f"{m[1]}.mid.attn_1.{rest}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)
    if m:
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)
    if m:
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return (k.replace("encoder.conv_norm_out", "encoder.norm_out")
            .replace("decoder.conv_norm_out", "decoder.norm_out"))


def main():
    import json
    ucfg = json.load(open(f"{TINY}/unet/config.json"))
    vcfg = json.load(open(f"{TINY}/vae/config.json"))
    unet = load_file(f"{TINY}/unet/diffusion_pytorch_model.safetensors")
    vae = load_file(f"{TINY}/vae/diffusion_pytorch_model.safetensors")
    te = load_file(f"{TINY}/text_encoder/model.safetensors")
    lpb = ucfg["layers_per_block"]
    attn_up = {i for i, t in enumerate(ucfg["up_block_types"]) if "CrossAttn" in t}
    sd = {}
    for k, v in unet.items():
        ldm = unet_to_ldm(k, lpb, attn_up)
        sd["model.diffusion_model." + ldm] = (v + 0.01).contiguous()  # the training copy
        sd["model_ema." + "".join(("diffusion_model." + ldm).split("."))] = v.contiguous()
    for k, v in vae.items():
        ldm = vae_to_ldm(k, len(vcfg["up_block_types"]))
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm):
            v = v[:, :, None, None]  # LDM's attention projections are 1×1 convolutions
        sd["first_stage_model." + ldm] = v.contiguous()
    for k, v in te.items():
        sd["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v.contiguous()
    # diffusers' converters take every tensor back to the folder's.
    back = sfu.convert_ldm_unet_checkpoint(sd, ucfg, extract_ema=True)
    assert set(back) == set(unet), (set(back) ^ set(unet))
    for k in unet:
        assert torch.equal(back[k], unet[k]), k
    vback = sfu.convert_ldm_vae_checkpoint(sd, vcfg)
    vnew = {new_attention_names(k): v for k, v in vae.items()}
    assert set(vback) == set(vnew), (set(vback) ^ set(vnew))
    for k in vnew:
        assert torch.equal(vback[k].reshape(vnew[k].shape), vnew[k]), k
    tback = sfu.convert_ldm_clip_checkpoint(sd)
    for k, v in te.items():
        kk = k if k in tback else "text_model." + k
        assert torch.equal(tback[kk], v), k
    # What is kept (the whole files are 32 MB): the key manifest diffusers just verified, from
    # which tests/single_file.rs writes the LDM file from the folder, and the VAE alone as an
    # fp16 .ckpt (a real pickle, read by the data-only reader).
    os.makedirs(OUT, exist_ok=True)
    manifest = {
        "unet": {k: unet_to_ldm(k, lpb, attn_up) for k in unet},
        "vae": {k: vae_to_ldm(k, len(vcfg["up_block_types"])) for k in vae},
        "text_encoder": {k: (k if k.startswith("text_model.") else "text_model." + k) for k in te},
    }
    with open(f"{OUT}/ldm_keys.json", "w") as f:
        json.dump(manifest, f, indent=0, sort_keys=True)
    vae_sd = {k: v.half() for k, v in sd.items() if k.startswith("first_stage_model.")}
    torch.save({"state_dict": vae_sd, "global_step": 22000}, f"{OUT}/tiny-vae-ldm-fp16.ckpt")
    print(f"{len(sd)} tensors; diffusers maps all {len(unet)} + {len(vae)} + {len(te)} back")


if __name__ == "__main__":
    main()
