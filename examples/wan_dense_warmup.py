"""Sparse Wan2.1 denoising with the first steps dense (the paper's and SVG's recipe).

    python examples/wan_dense_warmup.py

Builds a diffusers WanTransformer3DModel with random weights (Wan2.1-1.3B
shape on a GPU, a tiny one on CPU), optimizes it with draftopt, and runs a
flow-matching Euler loop whose first DENSE_STEPS steps use the original dense
attention through ``draftopt.dense``. The dense graph compiles once; switching
costs nothing afterwards.

With a real pipeline (weights from the Hub), the same in two lines:

    pipe.transformer = draftopt.optimize(pipe.transformer, sparsity=0.9)
    video = pipe(prompt, num_inference_steps=50,
                 callback_on_step_end=draftopt.DenseWarmup(pipe.transformer, steps=10)).frames
"""

import contextlib
import time

import torch
from diffusers import WanTransformer3DModel

import draftopt

STEPS, DENSE_STEPS = 8, 2


def main():
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:  # Wan2.1-1.3B dimensions, 4 layers; latent of a 480p, 29-frame video
        cfg = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=4)
        latent, opts = (8, 60, 104), {}
    else:  # tiny, so the example runs anywhere in a few seconds
        cfg = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2)
        latent, opts = (2, 16, 32), dict(tile=(4, 4), min_tokens=0, compiler="aot_eager")
    model = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096,
                                  freq_dim=256, **cfg).to(device, dtype).eval()
    model = draftopt.optimize(model, latent_shape=latent, sparsity=0.9, **opts)

    x = torch.randn(1, 16, *latent, device=device, dtype=dtype)
    text = torch.randn(1, 512, 4096, device=device, dtype=dtype)
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    with torch.no_grad():
        for i in range(STEPS):
            mode = draftopt.dense(model) if i < DENSE_STEPS else contextlib.nullcontext()
            t0 = time.perf_counter()
            with mode:
                v = model(hidden_states=x, timestep=torch.tensor([sigmas[i] * 1000], device=device),
                          encoder_hidden_states=text, return_dict=False)[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            if cuda:
                torch.cuda.synchronize()
            kind = "dense " if i < DENSE_STEPS else "sparse"
            print(f"step {i} ({kind}): {(time.perf_counter() - t0) * 1e3:8.1f} ms")
    print(draftopt.report(model))


if __name__ == "__main__":
    main()
