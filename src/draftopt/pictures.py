"""Pictures of block masks: the draft map beside the tiles it selected.

numpy and matplotlib (the ``pictures`` extra) are imported only when a picture is made.

Example:
    >>> model = draftopt.optimize(model, sparsity=0.9, capture_masks=True)
    >>> model(**inputs)
    >>> for site, masks in draftopt.captured_masks().items():
    ...     draftopt.save_mask_images(masks[0], f"out/{site}", heads=[0, 1])
"""

from __future__ import annotations

import os

from .kernels import DraftBlockMask

# RGB of each kind of block in the mask picture
KEPT, SKIPPED, TEXT = (31, 119, 180), (255, 255, 255), (255, 127, 14)


def mask_image(mask: DraftBlockMask, batch: int = 0, head: int = 0, pixels_per_block: int = 4):
    """numpy [n_blocks * p, n_blocks * p, 3] uint8: kept visual tile pairs blue, skipped white,
    text rows and columns (always computed) orange; query tiles are rows."""
    np = _import("numpy")
    g = mask.geometry
    S, nb = g.n_tiles, g.n_blocks
    img = np.empty((nb, nb, 3), dtype=np.uint8)
    img[:] = TEXT
    dense = mask.to_dense()[batch, head].cpu().numpy()
    img[:S, :S] = np.where(dense[..., None], np.array(KEPT, np.uint8), np.array(SKIPPED, np.uint8))
    return img.repeat(pixels_per_block, axis=0).repeat(pixels_per_block, axis=1)


def save_mask_images(mask: DraftBlockMask, prefix: str, heads=None, batch: int = 0,
                     pixels_per_block: int = 4) -> list[str]:
    """For each head: ``{prefix}_b{batch}_h{head}_mask.png`` (the mask, pixel-exact) and
    ``{prefix}_b{batch}_h{head}.png`` (draft map beside the mask, labelled). Returns the paths."""
    matplotlib = _import("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    B, H, S, _ = mask.shape
    heads = range(H) if heads is None else heads
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    paths = []
    for h in heads:
        if not 0 <= h < H or not 0 <= batch < B:
            raise ValueError(f"head {h} / batch {batch} out of range for a mask of {B} batches x {H} heads")
        img = mask_image(mask, batch, h, pixels_per_block)
        raw = f"{prefix}_b{batch}_h{h}_mask.png"
        matplotlib.image.imsave(raw, img)
        fig, axes = plt.subplots(1, 2, figsize=(10, 5))
        if mask.draft_map is not None:
            m = mask.draft_map[batch, h].float().cpu()
            top = max(float(m.max()), 1e-4)  # "mass" maps hold token counts (up to a tile's), not probabilities
            im = axes[0].imshow(m.numpy().clip(top * 1e-5), cmap="viridis", interpolation="nearest",
                                norm=LogNorm(vmin=top * 1e-5, vmax=top))
            fig.colorbar(im, ax=axes[0], fraction=0.046)
        axes[0].set_title("estimated block mass, log scale" if mask.policy == "mass"
                          else "draft map: softmax(pooled q . k), log scale")
        axes[1].imshow(mask_image(mask, batch, h, 1), interpolation="nearest")
        kept = mask.to_dense()[batch, h].float().mean().item()
        axes[1].set_title(f"computed blocks: blue {kept:.1%} of visual tile pairs"
                          + ("\norange: text blocks (always computed)" if mask.geometry.text_len else ""))
        for ax in axes:
            ax.set_xlabel("key tile")
            ax.set_ylabel("query tile")
        widened = "  [widened by the guard]" if bool(mask.widened()[batch, h]) else ""
        fig.suptitle(f"{os.path.basename(prefix)}: batch {batch}, head {h}{widened}\n{mask.geometry}")
        fig.tight_layout()
        pic = f"{prefix}_b{batch}_h{h}.png"
        fig.savefig(pic, dpi=100)
        plt.close(fig)
        paths += [pic, raw]
    return paths


def _import(name: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise RuntimeError(f"draftopt pictures need {name}: pip install 'draftopt[pictures]' "
                           f"(or pip install matplotlib numpy)") from e
