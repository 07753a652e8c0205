"""Video sparse-attention patterns at equal density: error against dense on a diffusers Wan transformer, and CPU speed.

    flock /tmp/bench.lock python -m benchmarks.video_patterns [--rounds 5] [--no-write]

Patterns (`blocks/sparse_patterns.py`, `blocks/pyramid_sparse.py`), all on `zoo.kernels.block_sparse_attention`:
PSA (its planner; quota of full-resolution blocks only, so that its density is the target), STA, GNA
(neighborhoods with a stride) and Radial Attention, each set to the density nearest each target; VMoBA at its
thresholds 0.1, 0.25 (the authors' default) and 0.5, chunks of 2 x 4 x 4 tokens (1-D/2-D/3-D by layer), its
density as reached. VMoBA selects per query token, so the op runs it with query blocks of one token: its speed
row shows that cost, not what a varlen kernel would reach.

1. Error: a random-weight diffusers `WanTransformer3DModel` (4 layers, 2 heads of 32) on a smooth latent video
   of 8 x 16 x 16 tokens after patching. The queries, keys and values of every self-attention call are
   captured from one dense forward; each pattern's attention output on them is compared with dense SDPA's
   (relative Frobenius error, mean over layers). Tiles of 1 x 4 x 4 tokens (blocks of 16).
2. The shipped digits DiT with each pattern in place of its attention (training-free): frame accuracy by the
   project's evaluator and PSNR/SSIM against dense generation from the same noise.
3. Speed: attention alone on 8 x 24 x 32 = 6,144 tokens, 4 heads of 64, batch 1, fp32, inference, against
   dense SDPA, alternated in one process (medians); tiles of 2 x 4 x 8 tokens (blocks of 64), the op's `auto`.
   Pattern tables are built once, outside the timing (they are static); PSA plans every call, as it must.

Radial Attention's density is set by the video's length (O(n log n) pairs): on 8 frames it cannot go below
about half, so its rows stand at the density it reaches. Not yet here (issue 18): the digits DiT retrained
with each pattern (`--model.attention sta`, ...).
"""

from __future__ import annotations

if not __package__:  # run as a file, `benchmarks` and `tests` would not import
    raise SystemExit("run from the repository root as: python -m benchmarks.video_patterns [args]")

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from zoo.blocks.pyramid_sparse import PSAConfig, PyramidSparseAttention
from zoo.blocks.sparse_patterns import pattern_at_density, vmoba_attention

from benchmarks._harness import alternate, write_section

TARGETS = (0.1, 0.2, 0.3, 0.5)
PATTERNS = ("psa", "sta", "neighborhood", "radial")
VMOBA_THRESHOLDS = (0.1, 0.25, 0.5)


class _Capture(TorchFunctionMode):
    """Records the q, k, v of every self-attention SDPA call over `length` tokens."""

    def __init__(self, length: int):
        super().__init__()
        self.length, self.calls = length, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            named = {**dict(zip(("query", "key", "value"), args, strict=False)), **kwargs}
            q, k, v = named["query"], named["key"], named["value"]
            if q.dim() == 4 and q.shape[2] == k.shape[2] == self.length:
                self.calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return func(*args, **kwargs)


def wan_attention_inputs() -> tuple[tuple[int, int, int], list]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=128,
        num_layers=4,
        rope_max_seq_len=64,
    ).eval()
    g = torch.Generator().manual_seed(1)
    coarse = torch.randn(1, 4, 3, 5, 5, generator=g)
    latents = F.interpolate(coarse, size=(8, 32, 32), mode="trilinear", align_corners=True)
    grid = (8, 16, 16)
    capture = _Capture(math.prod(grid))
    with torch.no_grad(), capture:
        model(hidden_states=latents, timestep=torch.tensor([900.0]), encoder_hidden_states=torch.randn(1, 5, 16))
    return grid, capture.calls


def _attention(name: str, grid, density: float, tile):
    """(attention(q, k, v) -> out, density) for a pattern at the density nearest `density`."""
    if name == "psa":
        block = math.prod(tile)
        psa = PyramidSparseAttention(
            PSAConfig(block_q=block, block_k=block, level_bounds=(density,) * 4, warmup_steps=0)
        )

        def run(q, k, v):
            return psa(q, k, v, grid=grid)

        with torch.no_grad():
            q = torch.randn(1, 1, math.prod(grid), 8)
            run(q, q, q)
        return run, float(psa.last_density)
    pattern = pattern_at_density(name, grid, density, tile=tile)
    return pattern.attend, pattern.density()


def error_rows() -> list[str]:
    grid, calls = wan_attention_inputs()
    rows = []
    for name in PATTERNS:
        for target in TARGETS:
            attend, density = _attention(name, grid, target, (1, 4, 4))
            with torch.no_grad():
                errors = [
                    float((attend(q, k, v) - (d := F.scaled_dot_product_attention(q, k, v))).norm() / d.norm())
                    for q, k, v in calls
                ]
            rows.append(f"| {name} | {target:.2f} | {density:.3f} | {sum(errors) / len(errors):.4f} |")
            print(rows[-1], flush=True)
    for threshold in VMOBA_THRESHOLDS:  # dynamic: the threshold sets the density, reported as reached
        errors, densities = [], []
        with torch.no_grad():
            for layer, (q, k, v) in enumerate(calls):
                out, density = vmoba_attention(q, k, v, grid, layer=layer, chunk=(2, 4, 4), threshold=threshold)
                d = F.scaled_dot_product_attention(q, k, v)
                errors.append(float((out - d).norm() / d.norm()))
                densities.append(float(density))
        mean_density = sum(densities) / len(densities)
        rows.append(f"| vmoba (threshold {threshold}) | - | {mean_density:.3f} | {sum(errors) / len(errors):.4f} |")
        print(rows[-1], flush=True)
    return rows


def digits_rows() -> list[str]:
    """The shipped digits VideoDiT, training-free: each pattern in place of its attention, against dense generation
    from the same noise (PSNR/SSIM) and by the project's digit evaluator (frame accuracy)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from zoo.evaluation import clip_metrics, train_frame_classifier
    from zoo.video import VideoDiTPipeline, disable_psa, enable_psa
    from zoo.video.dit import VideoDiTAttnProcessor
    from zoo.video.patterns import enable_pattern

    pipe = VideoDiTPipeline.from_pretrained(
        str(Path(__file__).resolve().parent.parent / "checkpoints/zoo-video-dit-digits")
    )
    pipe.set_progress_bar_config(disable=True)
    disable_psa(pipe.transformer)
    config = pipe.transformer.config
    size = config.sample_size
    labels = list(range(10))
    classifier, _ = train_frame_classifier(size=size, digit_size=size // 2)

    def generate():  # (B, T, 1, S, S) in [0, 1]
        return pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt").frames

    reference = generate()
    rows = []

    def score(name, target, density, video):
        ref, vid = (x.flatten(0, 1).float() for x in (reference, video))
        data_range = float(ref.max() - ref.min())
        psnr = float(peak_signal_noise_ratio(vid, ref, data_range=data_range))
        ssim = float(structural_similarity_index_measure(vid, ref, data_range=data_range, kernel_size=7))
        acc = clip_metrics(classifier, video[:, :, 0] * 2 - 1, torch.tensor(labels))["frame_accuracy"]
        rows.append(f"| {name} | {target} | {density} | {acc:.3f} | {psnr:.2f} | {ssim:.4f} |")
        print(rows[-1], flush=True)

    score("dense", "-", "1.000", reference)

    def with_pattern(name: str, **settings):
        """(video, mean density) generated with the model's attention set to a pattern, then put back to dense."""
        enable_pattern(pipe.transformer, name, settings)
        blocks, densities = pipe.transformer.blocks, []
        hook = pipe.transformer.register_forward_hook(
            lambda *_: densities.append(sum(b.attn.processor.last_density for b in blocks) / len(blocks))
        )
        try:
            video = generate()
        finally:
            hook.remove()
            for block in blocks:
                block.attn.set_processor(VideoDiTAttnProcessor())
        return video, sum(densities) / len(densities)

    for target in (0.15, 0.4):
        block = 16
        enable_psa(
            pipe.transformer,
            PSAConfig(block_q=block, block_k=block, level_bounds=(target,) * 4, warmup_steps=0),
        )
        video = generate()
        disable_psa(pipe.transformer)
        score("psa", f"{target:.2f}", f"{target:.3f}", video)
        for name in ("sta", "neighborhood", "radial"):
            video, density = with_pattern(name, density=target, tile=(1, 2, 2))
            score(name, f"{target:.2f}", f"{density:.3f}", video)
    for threshold in VMOBA_THRESHOLDS:
        video, density = with_pattern("vmoba", chunk=(2, 4, 4), threshold=threshold)
        score(f"vmoba (threshold {threshold})", "-", f"{density:.3f}", video)
    return rows


def speed_rows(rounds: int) -> list[str]:
    grid, tile = (8, 24, 32), (2, 4, 8)
    q, k, v = (torch.randn(1, 4, math.prod(grid), 64) for _ in range(3))
    rows = []
    for name in PATTERNS:
        for target in (0.1, 0.3):
            attend, density = _attention(name, grid, target, tile)

            def sparse(attend=attend):
                with torch.no_grad():
                    attend(q, k, v)

            def dense():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v)

            ts, td = alternate(sparse, dense, rounds)
            rows.append(f"| {name} | {target:.2f} | {density:.3f} | {ts * 1e3:.1f} | {td * 1e3:.1f} | {td / ts:.2f}x |")
            print(rows[-1], flush=True)
    densities = []

    def vmoba():
        with torch.no_grad():
            densities.append(float(vmoba_attention(q, k, v, grid, layer=2, chunk=(2, 4, 8), threshold=0.25)[1]))

    def dense():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    ts, td = alternate(vmoba, dense, max(1, rounds // 2))
    density = sum(densities) / len(densities)
    rows.append(
        f"| vmoba (3-D, threshold 0.25) | - | {density:.3f} | {ts * 1e3:.1f} | {td * 1e3:.1f} | {td / ts:.2f}x |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    errors = error_rows()
    torch.set_num_threads(1)  # as the digits recipe samples
    digits = digits_rows()
    torch.set_num_threads(args.threads)
    speeds = speed_rows(args.rounds)
    text = "\n".join(
        [
            "Patterns on the one block-sparse op, each at the setting whose density is nearest the target "
            "(`python -m benchmarks.video_patterns`; method in its docstring).",
            "",
            "Error of the attention output against dense SDPA, on the self-attention inputs of a random-weight "
            "diffusers Wan transformer (4 layers, 8 x 16 x 16 tokens, smooth latent), mean over layers:",
            "",
            "| pattern | target density | density | relative error |",
            "|---|---:|---:|---:|",
            *errors,
            "",
            "The shipped digits VideoDiT (checkpoints/zoo-video-dit-digits, trained with PSA at density 0.67), each "
            "pattern put in place of its attention without retraining (PSA: full-resolution quota only; patterns "
            "on tiles of 1 x 2 x 2 tokens of its 4 x 8 x 8 grid); 10 clips, one per digit, its own 25 steps and "
            "guidance 8, from the same noise. Frame accuracy: the project's digit evaluator "
            "(`zoo.evaluation`); PSNR/SSIM (torchmetrics, 7x7 window) against the dense generation:",
            "",
            "| pattern | target density | density | frame accuracy | PSNR (dB) | SSIM |",
            "|---|---:|---:|---:|---:|---:|",
            *digits,
            "",
            f"CPU inference, attention alone, 8 x 24 x 32 = 6,144 tokens, 4 heads of 64, fp32, {args.threads} "
            f"threads, alternated with dense SDPA ({args.rounds} rounds, medians):",
            "",
            "| pattern | target density | density | pattern ms | dense SDPA ms | speed |",
            "|---|---:|---:|---:|---:|---:|",
            *speeds,
        ]
    )
    print(text)
    if not args.no_write:
        write_section("video_patterns", text, title="Video sparse-attention patterns at equal density (CPU)")


if __name__ == "__main__":
    main()
