"""Pipeline level: one Wan2.1-1.3B text-to-video run (diffusers WanPipeline), dense Inductor vs draftopt.

    PYTHONPATH=src:/tmp/site python benchmarks/pipeline.py --timed-steps 3     # GPU (not yet run on one)
    python benchmarks/pipeline.py --tiny                                        # CPU: tiny dims, 3 steps, ~20 s

The WanPipeline of examples/wan_t2v.py (``random_pipeline``), random weights, bf16 (the modules Wan keeps in
float32 stay float32): a WanTransformer3DModel with Wan2.1-1.3B dimensions at full depth (30 layers, 12 heads
x 128, ffn 8960, 16 channels in and out, text_dim 4096, patch (1, 2, 2)), Wan2.1's VAE config, 480p x 81
frames (latent 21 x 60 x 104: 32,760 video tokens), 512 text tokens, 50 steps with CFG (guidance 5: two
transformer calls a step).

Rows: dense, the transformer under ``torch.compile`` (Inductor, dynamic=False) with diffusers' native
attention, i.e. the SDPA backend PyTorch picks (the row names it: cuDNN or flash on an H200); draftopt,
``draftopt.optimize(transformer, sparsity=0.9)`` with ``draftopt.DenseWarmup`` running the first 10 steps on
its dense graph. ``--compile regional`` (the default) compiles the repeated blocks only
(``compile_repeated_blocks`` / ``optimize(regional=True)``): one block's graph serves all 30, for a fraction
of the compile time; ``--compile full`` compiles the whole transformer.

Timing (device time is short, so nothing runs 50 steps): each row runs the pipeline for a few steps, with
``output_type="latent"``: one untimed step, which compiles, then ``--timed-steps K`` timed steps; draftopt
does this once per mode (K + 1 dense, then K + 1 sparse steps: the first sparse step compiles the sparse
graph; the script checks that the steps ran in these modes). A step's time is the wall time between the ends
of two consecutive steps (CUDA events recorded in ``callback_on_step_end``, no sync inside the loop): both
transformer calls, the CFG combine, the scheduler step. per-step ms: mean of the K timed steps; loop s:
``--steps`` x per-step ms (draftopt: dense steps x its dense ms + the rest x its sparse ms), i.e.
extrapolated from K steps, as the table says. video s: loop s + the VAE decode (random latents of the run's
shape, 81 frames at 480p, with the pipeline's postprocessing to numpy; one call, not warmed up, shared by
both rows; ``--no-decode`` skips it). Text encoding is excluded: the text encoder is a tiny random 2-layer
UMT5 of width 4096 (the real pipeline's one UMT5-XXL call a video is not measured); the prompt embeddings
are computed once and passed to every run. Compile time is in the untimed steps only.

``--tiny``: tiny dims, 5 x 128 x 256 frames, 3 steps (1 dense), 1 timed step, on the CPU, one thread,
compiled with backend "eager" (Dynamo's graphs, rewritten by draftopt, run without Inductor): it checks the
script (tests/benchmarks/test_pipeline.py), its numbers mean nothing.

Prints a markdown table last; appends its rows to benchmarks/results/pipeline.jsonl (``_results.save_table``;
JSON and CSV of the run go to ``--out``, default $OUT or '.'). WanPipeline needs transformers and tokenizers:
on the GPU machine, install the wheels of .whl/pipeline/ (carried with .whl) beside diffusers', e.g.

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .whl/pipeline/*.whl
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tabulate import tabulate

import draftopt

if __package__:  # imported as benchmarks.pipeline (tests)
    from . import _results
else:
    import _results

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import wan_t2v  # noqa: E402  (examples/wan_t2v.py: the random-weight WanPipeline)

HEADERS = ["config", "per-step ms (dense steps / sparse steps)", "loop s", "video s", "x dense (video)",
           "x dense (loop)", "timing"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny dims on the CPU, 3 steps: checks the script runs")
    ap.add_argument("--steps", type=int, help="denoising steps of the video (default 50; --tiny 3)")
    ap.add_argument("--dense-steps", type=int, help="draftopt's dense warm-up steps (default 10; --tiny 1)")
    ap.add_argument("--timed-steps", type=int, help="steps timed per mode, then extrapolated (default 3; --tiny 1)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--compile", choices=["regional", "full"], default="regional",
                    help="compile the repeated blocks (default) or the whole transformer")
    ap.add_argument("--no-decode", action="store_true", help="skip timing the VAE decode")
    ap.add_argument("--out", help="folder for this run's JSON / CSV (default $OUT or '.')")
    args = ap.parse_args(argv)
    defaults = dict(steps=3, dense_steps=1, timed_steps=1) if args.tiny else dict(steps=50, dense_steps=10,
                                                                                   timed_steps=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0 <= args.dense_steps <= args.steps or args.timed_steps < 1:
        ap.error("need 0 <= --dense-steps <= --steps and --timed-steps >= 1")
    return args


def setup(args) -> dict:
    """Device, dtype, video size, the dense baseline's backend and draftopt's options."""
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    size = "tiny" if args.tiny else "1.3b"
    video = {k: wan_t2v.SIZES[size]["video"][k] for k in ("frames", "height", "width")}
    if args.tiny:
        video["frames"] = 5  # latent 2 x 16 x 32: 16 tiles of 4 x 4 tokens; a test's time
    backend = "inductor" if cuda else "eager"  # CPU: Dynamo's graphs run as they are (compiles in seconds)
    return dict(cuda=cuda, device=device, dtype=torch.bfloat16 if cuda else torch.float32, size=size, **video,
                backend=backend, opts={**wan_t2v.draftopt_options(size, device), "compiler": backend})


def build(cfg: dict):
    """The random-weight pipeline, its latent (T, H, W) and the (prompt, negative prompt) embeddings."""
    pipe = wan_t2v.random_pipeline(cfg["size"], cfg["device"], cfg["dtype"])
    pipe.set_progress_bar_config(disable=True)  # this script prints its own table
    latent = wan_t2v.latent_shape(pipe, cfg["frames"], cfg["height"], cfg["width"])
    with torch.no_grad():
        embeds = pipe.encode_prompt(wan_t2v.PROMPT, wan_t2v.NEGATIVE, do_classifier_free_guidance=True,
                                    device=cfg["device"], dtype=cfg["dtype"])
    return pipe, latent, embeds


class StepClock:
    """A ``callback_on_step_end`` marking the end of each step (CUDA events, or perf_counter on the CPU),
    after calling ``warmup`` (a DenseWarmup) if given; ``dense`` says which steps ran in its dense steps."""

    def __init__(self, cuda: bool, warmup: draftopt.DenseWarmup | None = None):
        self.cuda, self.warmup, self.marks, self.dense = cuda, warmup, [], []

    def __call__(self, pipe, step, timestep, callback_kwargs):
        if self.warmup is not None:
            self.dense.append(self.warmup.active)  # before the call that may end the warm-up
            callback_kwargs = self.warmup(pipe, step, timestep, callback_kwargs)
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())
        return callback_kwargs

    def step_ms(self) -> list[float]:
        """ms of steps 1.. (step i: from the end of step i - 1 to its own end)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def run_steps(pipe, cfg: dict, embeds, steps: int, clock: StepClock) -> None:
    """The pipeline for ``steps`` denoising steps with CFG, up to the latents (no decode)."""
    with torch.no_grad():
        pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_frames=cfg["frames"],
             height=cfg["height"], width=cfg["width"], num_inference_steps=steps, guidance_scale=5.0,
             generator=torch.Generator(cfg["device"]).manual_seed(0), output_type="latent",
             callback_on_step_end=clock)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def time_dense(pipe, cfg: dict, embeds, args) -> float:
    """Mean ms of a step, the transformer under torch.compile (regional: its repeated blocks)."""
    transformer = pipe.transformer
    if args.compile == "regional":
        transformer.compile_repeated_blocks(dynamic=False, backend=cfg["backend"])
    else:
        pipe.transformer = torch.compile(transformer, dynamic=False, backend=cfg["backend"])
    clock = StepClock(cfg["cuda"])
    run_steps(pipe, cfg, embeds, args.timed_steps + 1, clock)
    pipe.transformer = transformer
    for block in transformer.modules():  # undo compile_repeated_blocks
        if type(block).__name__ in transformer._repeated_blocks:
            block._compiled_call_impl = None
    torch._dynamo.reset()
    return mean(clock.step_ms())


def time_draftopt(pipe, cfg: dict, embeds, latent, args) -> tuple[float | None, float, draftopt.Report]:
    """Mean ms of a dense warm-up step (None without any) and of a sparse step, and the report."""
    transformer = pipe.transformer
    pipe.transformer = draftopt.optimize(transformer, latent_shape=latent, sparsity=args.sparsity,
                                         regional=args.compile == "regional", **cfg["opts"])
    k = args.timed_steps
    warm = k + 1 if args.dense_steps else 0  # steps 0..k dense (0 compiles), k+1 compiles the sparse graph
    clock = StepClock(cfg["cuda"], draftopt.DenseWarmup(pipe.transformer, steps=warm))
    run_steps(pipe, cfg, embeds, warm + k + 1, clock)
    ms = clock.step_ms()  # ms[i - 1] is step i
    if clock.dense != [True] * warm + [False] * (k + 1):
        raise RuntimeError(f"draftopt.DenseWarmup(steps={warm}) ran steps dense as {clock.dense}")
    report = draftopt.report(pipe.transformer)
    pipe.transformer = transformer
    return (mean(ms[:k]) if warm else None), mean(ms[warm:]), report


def time_decode(pipe, cfg: dict, latent) -> float:
    """Seconds of one VAE decode of a latent of the run's shape, with the pipeline's postprocessing."""
    vae = pipe.vae
    latents = torch.randn(1, vae.config.z_dim, *latent, device=cfg["device"], dtype=vae.dtype)
    mean_ = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    if cfg["cuda"]:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():  # as WanPipeline.__call__ after the loop
        video = vae.decode(latents * std + mean_, return_dict=False)[0]
        pipe.video_processor.postprocess_video(video, output_type="np")
    if cfg["cuda"]:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def sdpa_choice(pipe, cfg: dict, latent) -> str:
    """The SDPA backend PyTorch picks for the video self-attention (as diffusers' native backend calls it)."""
    from torch.nn.attention import SDPBackend

    c = pipe.transformer.config
    tokens = latent[0] * (latent[1] // c.patch_size[1]) * (latent[2] // c.patch_size[2])
    q = torch.empty(1, tokens, c.num_attention_heads, c.attention_head_dim, device=cfg["device"],
                    dtype=cfg["dtype"]).transpose(1, 2)
    return SDPBackend(torch._fused_sdp_choice(q, q, q)).name.lower()


def rows_of(args, cfg: dict, dense_ms: float, warm_ms: float | None, sparse_ms: float,
            decode_s: float | None) -> list[list]:
    """The table: per-step ms, loop s extrapolated to --steps, video s = loop + decode, speedups."""
    loops = [args.steps * dense_ms / 1e3,
             (args.dense_steps * (warm_ms or 0.0) + (args.steps - args.dense_steps) * sparse_ms) / 1e3]
    videos = [None if decode_s is None else s + decode_s for s in loops]
    timing = f"extrapolated from {plural(args.timed_steps, 'step')} to {args.steps}"
    names = [f"dense ({cfg['backend']}, SDPA {cfg['sdpa']})",
             f"draftopt {args.sparsity}, {plural(args.dense_steps, 'dense step')}"]
    steps = [f"{dense_ms:.1f} / -", f"{'-' if warm_ms is None else f'{warm_ms:.1f}'} / {sparse_ms:.1f}"]
    rows = []
    for name, per_step, loop, video in zip(names, steps, loops, videos):
        rows.append([name, per_step, f"{loop:.2f}", "-" if video is None else f"{video:.2f}",
                     "-" if video is None else f"{videos[0] / video:.2f}x", f"{loops[0] / loop:.2f}x", timing])
    return rows


def main(argv=None) -> list[list]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.tiny:  # tiny ops gain nothing from threads, and lose much to them on a loaded CPU
        torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> list[list]:
    """Time both rows and the decode; print the header line and the table; save the rows."""
    cfg = setup(args)
    pipe, latent, embeds = build(cfg)
    cfg["sdpa"] = sdpa_choice(pipe, cfg, latent)
    dense_ms = time_dense(pipe, cfg, embeds, args)
    warm_ms, sparse_ms, report = time_draftopt(pipe, cfg, embeds, latent, args)
    decode_s = None if args.no_decode else time_decode(pipe, cfg, latent)
    rows = rows_of(args, cfg, dense_ms, warm_ms, sparse_ms, decode_s)
    sites = summary(report, args)
    meta = dict(device=torch.cuda.get_device_name() if cfg["cuda"] else "CPU tiny", diffusers=_diffusers_version(),
                size=cfg["size"], latent=list(latent), frames=cfg["frames"], height=cfg["height"],
                width=cfg["width"], steps=args.steps, dense_steps=args.dense_steps, timed_steps=args.timed_steps,
                sparsity=args.sparsity, compile=args.compile, sdpa=cfg["sdpa"], decode_s=decode_s,
                rewritten=sites["rewritten"], sites=sites["sites"], kernels=sites["kernels"],
                dense_step_ms=dense_ms, draftopt_dense_step_ms=warm_ms, draftopt_sparse_step_ms=sparse_ms)
    print(header(args, meta, sites["text"]))
    _results.save_table("pipeline", HEADERS, rows, meta, out=args.out)
    print(tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True))
    return rows


def header(args, meta: dict, sites: str) -> str:
    dims = "tiny" if args.tiny else "Wan2.1-1.3B dims, 30 layers"
    decode = "skipped" if meta["decode_s"] is None else f"{meta['decode_s']:.2f} s (once)"
    return (f"{meta['device']}, torch {torch.__version__}, diffusers {meta['diffusers']}; WanPipeline {dims}, "
            f"random weights, {meta['frames']} x {meta['height']} x {meta['width']} (latent "
            f"{'x'.join(map(str, meta['latent']))}), {args.steps} steps with CFG; compile {args.compile}; {sites}; "
            f"VAE decode {decode}; text encoding excluded")


def summary(report, args) -> dict:
    """Attention sites of the sparse graphs (the dense warm-up graph's are all dense by design)."""
    sparse = [s for g in report.graphs if g.config.get("enabled", True) for s in g.sites]
    rewritten = [s for s in sparse if s.status == "rewritten"]
    kernels = sorted({s.kernel for s in rewritten})
    text = f"{len(rewritten)} of {len(sparse)} attention sites rewritten ({', '.join(kernels) or 'none!'})"
    if args.compile == "regional":
        text += ", in the one block graph every block runs"
    return dict(rewritten=len(rewritten), sites=len(sparse), kernels=kernels, text=text)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


if __name__ == "__main__":
    main()
