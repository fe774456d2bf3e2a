"""Wan2.1 text-to-video through diffusers' WanPipeline, its transformer running draft attention.

    python examples/wan_t2v.py                    # random weights: tiny on a CPU (~30 s), Wan2.1-1.3B on a GPU
    python examples/wan_t2v.py --checkpoint Wan-AI/Wan2.1-T2V-1.3B-Diffusers --output wan.mp4
    python examples/wan_t2v.py --size tiny --steps 4 --dense-steps 1 --sparsity 0.9 --seed 0

Without ``--checkpoint`` the pipeline is built from configs with random
weights: a WanTransformer3DModel (``--size tiny``: 2 layers of 2 heads x 16;
``--size 1.3b``: Wan2.1-1.3B's 30 layers of 12 heads x 128, ffn 8960), an
AutoencoderKLWan (tiny: 8 base channels; 1.3b: Wan2.1's VAE config), a
UMT5EncoderModel from a 2-layer T5 config whose width is the transformer's
``text_dim``, and a byte-level tokenizer built offline with the ``tokenizers``
library (256 byte tokens plus T5's ``<pad>``, ``</s>``, ``<unk>``), so the
prompts go through the pipeline's own text encoding. The video is noise:
the weights are random. ``--size`` (also the default video size, and
draftopt's 4x4 tiles without a token floor for tiny) defaults to 1.3b with
``--checkpoint`` or on a GPU, tiny on a CPU, where the ~30 s are mostly
imports and compiling (``aot_eager`` there, Inductor on a GPU).

The script sets ``pipe.transformer = draftopt.optimize(pipe.transformer,
latent_shape=..., sparsity=...)``, runs the pipeline with classifier-free
guidance (guidance_scale 5, a negative prompt) and
``callback_on_step_end=draftopt.DenseWarmup(pipe.transformer, steps=...)``
(the first ``--dense-steps`` steps dense), shows the pipeline's progress bar,
then prints ``draftopt.report(pipe.transformer)`` and the wall time of the
call (which includes compiling the sparse and the dense graph: the first
call of a process compiles). ``--output video.mp4`` saves the frames with
``diffusers.utils.export_to_video`` (needs imageio and imageio-ffmpeg).

``--fp8`` adds ``precision="fp8"`` (FP8 attention: Hopper's kernel on an
H100 / H200, simulated on a CPU; opt-in, about 1% error of its own: README).
``--fp8-linears`` first quantizes the transformer's linear layers with
torchao's float8 dynamic-activation config (a CUDA GPU with FP8, and
``pip install torchao``); with both, a Wan2.1-14B-shaped model runs 3.67x
faster than dense bf16 (BENCHMARKS.md, "Model level").

Needs diffusers and transformers, and accelerate for ``--checkpoint``
(``pip install -e ".[diffusers]"``).
"""

from __future__ import annotations

import argparse
import time

import torch

import draftopt

PROMPT = "A cat walks on the grass, realistic"
NEGATIVE = "Bright tones, overexposed, static, blurred details, worst quality, low quality"
# Per size: transformer dims, text encoder width, VAE config, default frames / height / width / steps / dense steps.
SIZES = {
    "tiny": dict(transformer=dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2,
                                  text_dim=32, freq_dim=32),
                 vae=dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
                 video=dict(frames=9, height=128, width=256, steps=4, dense_steps=1)),
    "1.3b": dict(transformer=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                                  text_dim=4096, freq_dim=256),
                 vae=dict(),
                 video=dict(frames=81, height=480, width=832, steps=50, dense_steps=10)),
}


def byte_tokenizer():
    """A T5-style tokenizer built offline: one token per byte, ``</s>`` appended, ``<pad>`` = 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def text_encoder(width: int, vocab_size: int):
    """A random 2-layer UMT5 encoder whose hidden size is the transformer's text_dim."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=vocab_size, d_model=width, d_kv=64, d_ff=256, num_layers=2, num_heads=2,
                     feed_forward_proj="gated-gelu")
    return UMT5EncoderModel(cfg)


def cast(model, dtype: torch.dtype):
    """``model`` in ``dtype`` as ``from_pretrained(dtype=dtype)`` leaves it: its ``_keep_in_fp32_modules``
    (Wan's time embedder, norms, modulation table) stay float32."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not keep.intersection(name.split(".")):
            t.data = t.data.to(dtype)
    return model


def random_pipeline(size: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A WanPipeline of random-weight components built from configs, initialized on ``device``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    dims = SIZES[size]
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    with torch.device(device):  # random init where the weights will live: seconds, not a minute, for 1.3B
        transformer = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16,
                                            rope_max_seq_len=1024, **dims["transformer"])
        encoder = text_encoder(dims["transformer"]["text_dim"], len(tokenizer))
        vae = AutoencoderKLWan(z_dim=16, **dims["vae"])
    return WanPipeline(tokenizer=tokenizer, text_encoder=cast(encoder, dtype), vae=cast(vae, dtype),
                       transformer=cast(transformer, dtype), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def load_pipeline(args, device: str, dtype: torch.dtype):
    """The pretrained pipeline (its VAE in float32, as Wan's model card loads it) or the random one, on ``device``."""
    from diffusers import WanPipeline

    if not args.checkpoint:
        return random_pipeline(args.size, device, dtype)
    return WanPipeline.from_pretrained(args.checkpoint, dtype={"default": dtype, "vae": torch.float32}).to(device)


def latent_shape(pipe, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(T, H, W) of the latent the pipeline denoises for this video size."""
    t, s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    return (frames - 1) // t + 1, height // s, width // s


def draftopt_options(size: str, device: str) -> dict:
    """Tiny models need smaller tiles and no token floor; on a CPU, aot_eager instead of Inductor."""
    opts = dict(tile=(4, 4), min_tokens=0) if size == "tiny" else {}
    return {**opts, "compiler": "aot_eager"} if device == "cpu" else opts


def quantize_fp8_linears(transformer) -> None:
    """torchao's float8 linears (weights and activations in e4m3, per-row scales), in place, before optimize."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise RuntimeError(f"--fp8-linears needs torchao ({e}): pip install torchao") from e
    # set_inductor_config=False: leave Inductor's settings as they are for the rest of the process
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="WanPipeline path or Hub id (default: random weights)")
    ap.add_argument("--size", choices=SIZES, help="random-weight model size, and the defaults of the video size "
                    "and of draftopt's tiles (default: 1.3b with --checkpoint or on a GPU, else tiny)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--steps", type=int, help="denoising steps (default: 4 tiny, 50 1.3b)")
    ap.add_argument("--dense-steps", type=int, help="first steps run dense (default: 1 tiny, 10 1.3b)")
    ap.add_argument("--frames", type=int, help="4k + 1 (default: 9 tiny, 81 1.3b)")
    ap.add_argument("--height", type=int, help="multiple of 16 (default: 128 tiny, 480 1.3b)")
    ap.add_argument("--width", type=int, help="multiple of 16 (default: 256 tiny, 832 1.3b)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--output", help="save the video here (e.g. wan.mp4)")
    ap.add_argument("--fp8", action="store_true", help='FP8 attention (precision="fp8")')
    ap.add_argument("--fp8-linears", action="store_true", help="torchao float8 linears in the transformer (CUDA)")
    args = ap.parse_args(argv)
    if args.fp8_linears and not cuda:
        ap.error("--fp8-linears needs a CUDA GPU with FP8 matmuls (torchao's float8 linears do not run on a CPU)")
    args.size = args.size or ("1.3b" if args.checkpoint or cuda else "tiny")
    for key, value in SIZES[args.size]["video"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.frames % 4 != 1 or args.height % 16 or args.width % 16:
        ap.error("--frames must be 4k + 1 and --height / --width multiples of 16 (what the pipeline would round to)")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu" and args.size == "tiny":
        torch.set_num_threads(1)  # tiny ops gain nothing from threads, and lose much to them on a busy CPU
    pipe = load_pipeline(args, device, dtype)
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    latent = latent_shape(pipe, args.frames, args.height, args.width)
    if args.fp8_linears:
        quantize_fp8_linears(pipe.transformer)
    precision = {"precision": "fp8"} if args.fp8 else {}
    pipe.transformer = draftopt.optimize(pipe.transformer, latent_shape=latent, sparsity=args.sparsity,
                                         **draftopt_options(args.size, device), **precision)
    print(f"Wan2.1 {'from ' + args.checkpoint if args.checkpoint else args.size + ', random weights'} on {device}: "
          f"{args.frames} x {args.height} x {args.width}, latent {latent}, {args.steps} steps "
          f"({args.dense_steps} dense), sparsity {args.sparsity}{', FP8 attention' if args.fp8 else ''}"
          f"{', FP8 linears' if args.fp8_linears else ''}")
    t0 = time.perf_counter()
    with torch.no_grad():
        video = pipe(prompt=args.prompt, negative_prompt=NEGATIVE, num_frames=args.frames, height=args.height,
                     width=args.width, num_inference_steps=args.steps, guidance_scale=5.0,
                     generator=torch.Generator(device).manual_seed(args.seed),
                     callback_on_step_end=draftopt.DenseWarmup(pipe.transformer, steps=args.dense_steps)).frames[0]
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(draftopt.report(pipe.transformer))
    print(f"wall time: {wall:.1f} s for {args.steps} steps with CFG and the VAE decode "
          f"(includes compiling the sparse and the dense graph); video {tuple(video.shape)}")
    if args.output:
        from diffusers.utils import export_to_video

        print("saved", export_to_video(video, args.output, fps=16))


if __name__ == "__main__":
    main()
