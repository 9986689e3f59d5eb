#!/usr/bin/env python3
"""An A1111 hypernetwork for tiny-ip2p and the UNet output it gives, as A1111's
`modules/hypernetworks/hypernetwork.py` applies it: for every attention layer whose context
width has a pair of modules, k = to_k(h_k(context)) and v = to_v(h_v(context)), where
h(x) = x + strength · MLP(x) (self-attention's context is its input, so widths 32 and 64 get
theirs too; cross-attention's is the text, width 32 here). The MLP follows the file's
`layer_structure` [1, 2, 1], `activation_func` "relu", `is_layer_norm` true; dropout does
nothing at inference. Recorded in float32 and float64 (the bound is ten times their distance).

    /tmp/ref/bin/python tools/gen_hypernetwork.py   # writes tests/fixtures/hypernetwork/
"""
import os
from collections import OrderedDict

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "../shared/fixtures/tiny-ip2p")
OUT = os.path.join(ROOT, "tests/fixtures/hypernetwork")
STRENGTH = 0.7


def module_state(dim, g):
    """linear.0 (dim→2dim), relu, LayerNorm (linear.2), linear.3 (2dim→dim), LayerNorm (linear.4)."""
    s = OrderedDict()
    s["linear.0.weight"] = torch.randn(2 * dim, dim, generator=g) * 0.3
    s["linear.0.bias"] = torch.randn(2 * dim, generator=g) * 0.1
    s["linear.2.weight"] = 1 + torch.randn(2 * dim, generator=g) * 0.1
    s["linear.2.bias"] = torch.randn(2 * dim, generator=g) * 0.1
    s["linear.3.weight"] = torch.randn(dim, 2 * dim, generator=g) * 0.3
    s["linear.3.bias"] = torch.randn(dim, generator=g) * 0.1
    s["linear.4.weight"] = 1 + torch.randn(dim, generator=g) * 0.1
    s["linear.4.bias"] = torch.randn(dim, generator=g) * 0.1
    return s


def apply(state, x):
    d = x.dtype
    y = torch.nn.functional.linear(x, state["linear.0.weight"].to(d), state["linear.0.bias"].to(d))
    y = torch.relu(y)
    y = torch.nn.functional.layer_norm(y, y.shape[-1:], state["linear.2.weight"].to(d), state["linear.2.bias"].to(d))
    y = torch.nn.functional.linear(y, state["linear.3.weight"].to(d), state["linear.3.bias"].to(d))
    y = torch.nn.functional.layer_norm(y, y.shape[-1:], state["linear.4.weight"].to(d), state["linear.4.bias"].to(d))
    return x + y * STRENGTH


class HyperProcessor:
    """diffusers' AttnProcessor with A1111's hypernetwork on the context of k and v."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        ck = cv = ctx
        pair = self.layers.get(ctx.shape[-1])
        if pair is not None:
            ck, cv = apply(pair[0], ctx), apply(pair[1], ctx)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(ck))
        v = attn.head_to_batch_dim(attn.to_v(cv))
        probs = attn.get_attention_scores(q, k, None)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def main():
    g = torch.Generator().manual_seed(7)
    layers = {dim: [module_state(dim, g), module_state(dim, g)] for dim in (32, 64)}
    hn = {**layers, "step": 1000, "name": "tiny-style", "layer_structure": [1, 2, 1],
          "activation_func": "relu", "is_layer_norm": True, "weight_initialization": "Normal",
          "use_dropout": True, "dropout_structure": [0, 0.1, 0], "activate_output": False,
          "last_layer_dropout": False, "sd_checkpoint": "tiny", "sd_checkpoint_name": "tiny"}
    os.makedirs(OUT, exist_ok=True)
    torch.save(hn, f"{OUT}/tiny-style.pt")
    sample = torch.randn(1, 8, 8, 8, generator=g)
    ehs = torch.randn(1, 77, 32, generator=g)
    outs = {}
    for dtype in (torch.float32, torch.float64):
        unet = UNet2DConditionModel.from_pretrained(f"{TINY}/unet").to(dtype)
        unet.set_attn_processor(HyperProcessor(layers))
        with torch.no_grad():
            outs[dtype] = unet(sample.to(dtype), 500, ehs.to(dtype)).sample
        plain = UNet2DConditionModel.from_pretrained(f"{TINY}/unet").to(dtype)
    with torch.no_grad():
        base = plain.to(torch.float32)(sample, 500, ehs).sample
    tol = max(10 * (outs[torch.float32].double() - outs[torch.float64]).abs().max().item(), 1e-6)
    print(f"hypernetwork changes the output by {(outs[torch.float32] - base).abs().max():.3e}; tol {tol:.3e}")
    save_file({"unet_sample": sample, "unet_ehs": ehs, "unet_out": outs[torch.float32].contiguous(),
               "tol.unet_out": torch.tensor([tol], dtype=torch.float32)},
              f"{OUT}/tiny-style-case.safetensors",
              metadata={"strength": str(STRENGTH), "timestep": "500", "file": "tiny-style.pt"})


if __name__ == "__main__":
    main()
