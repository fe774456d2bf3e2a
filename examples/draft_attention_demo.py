"""Draft attention on one video-sized attention call, against dense attention.

    python examples/draft_attention_demo.py

Uses CUDA (Triton kernels) when available, else the PyTorch reference path
at a smaller size.
"""

import time

import torch
import torch.nn.functional as F

from draftopt.kernels import draft_attention


def video_like_qkv(grid, text_len, heads, device, dtype, D=128, sharpness=4.0):
    """q, k with spatio-temporal locality (random Fourier features of each token's
    (t, h, w) position), as trained video DiTs have: attention concentrates near
    the query, which is what the draft map detects. Random q, k would attend
    almost uniformly and no sparse method could keep their output."""
    T, H, W = grid
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    pos = torch.stack([t, h, w], -1).reshape(-1, 3).float() / 8.0
    freqs = torch.randn(heads, 3, D // 2) * sharpness
    ang = pos[None] @ freqs  # [heads, N, D/2]
    feat = torch.cat([ang.cos(), ang.sin()], -1) * (D ** 0.25)
    text = torch.randn(heads, text_len, D)
    qk = torch.cat([feat, text], 1)[None]
    q = qk + 0.3 * torch.randn_like(qk)
    k = qk + 0.3 * torch.randn_like(qk)
    v = torch.randn_like(qk)
    return (x.to(device, dtype) for x in (q, k, v))


def main():
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    grid, text_len, heads = ((8, 30, 52), 256, 12) if cuda else ((4, 16, 32), 77, 4)
    L = grid[0] * grid[1] * grid[2] + text_len
    q, k, v = video_like_qkv(grid, text_len, heads, device, dtype)
    print(f"device {device}, {dtype}, grid {grid} + {text_len} text tokens, {heads} heads, L = {L}")

    with torch.no_grad():
        dense = F.scaled_dot_product_attention(q, k, v)
        for sparsity in (0.0, 0.5, 0.9):
            draft_attention(q, k, v, grid, text_len=text_len, sparsity=sparsity)  # warm-up
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out, mask = draft_attention(q, k, v, grid, text_len=text_len, sparsity=sparsity, return_mask=True)
            if cuda:
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            err = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
            print(f"sparsity {sparsity:.1f}: kept {mask.density():6.1%} of tile pairs, "
                  f"rel. error vs dense {err:.4f}, {ms:7.1f} ms")
        print(mask)


if __name__ == "__main__":
    main()
