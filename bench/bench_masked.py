"""Masked image modelling: what the visible-token encoder saves. One training step (forward +
backward, the optimizer left out) of the ``vit`` encoder on the visible 25% of the patches (MAE's
mask ratio 0.75, ``patch_masking``'s marked input) against the same encoder on all patches, and a
whole ``mae`` step (masking, encoder on the visible patches, decoder, loss on the hidden ones).

The encoder is ViT-Tiny's width (192, 3 heads) at 4 blocks on 3x32x32 images in 4x4 patches (64
tokens), batch 64; the decoder 96 wide, 1 block. ``share`` is each step's time over the encoder's
on all tokens (goal: the visible encoder close to 0.25; attention is quadratic in the tokens and
the rest linear, so it can fall below). Peak memory as ``bench_ssl`` measures it: CUDA's allocator,
or on the CPU the resident-set growth in a fresh process. Median over interleaved rounds, one CPU
thread, after a warm-up step each.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench.measure import child_peak_memory, interleaved_medians, peak_bytes

SECTION = "Masked image modelling: MAE step vs the encoder on all tokens"
BATCH, IMAGE, PATCH, RATIO = 64, (3, 32, 32), 4, 0.75
ROUNDS = 3


def cases(device: torch.device) -> list[tuple[str, Callable[[], None]]]:
    """``(name, step)``: each step runs forward and backward on fixed inputs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sdk
    from sdk import keys

    torch.manual_seed(0)
    vit = sdk.create("encoder", "vit", image_shape=IMAGE, patch_size=PATCH, embed_dim=192,
                     depth=4, heads=3, mlp_ratio=4.0).to(device)
    mae = sdk.create("objective", "mae", image_shape=IMAGE, patch_size=PATCH, embed_dim=192,
                     decoder_dim=96, decoder_depth=1, decoder_heads=3).to(device)
    masker = sdk.create("transform", "patch_masking", image_shape=IMAGE, patch_size=PATCH,
                        mask_ratio=RATIO)
    x = torch.rand(BATCH, *IMAGE, generator=torch.Generator().manual_seed(0)).to(device)
    batch = sdk.Batch(index=torch.arange(BATCH, device=device))
    fixed, _ = masker(x, batch)

    def clear() -> None:
        for p in [*vit.parameters(), *mae.parameters()]:
            p.grad = None

    def encoder_all() -> None:
        clear()
        vit.features(x).float().pow(2).mean().backward()

    def encoder_visible() -> None:
        clear()
        vit.features(fixed).float().pow(2).mean().backward()

    def mae_step() -> None:
        clear()
        xv, b = masker(x, batch)
        tokens = vit.features(xv)
        views = sdk.Views(embeddings=(vit.head(tokens),), extras={keys.FEATURES: (tokens,)})
        mae(views, b).value.backward()

    return [("vit, all 64 tokens", encoder_all),
            (f"vit, 16 visible (mask {RATIO})", encoder_visible),
            (f"mae step (mask {RATIO})", mae_step)]


def peak_memory(device: torch.device) -> dict[str, int]:
    peaks = {}
    for name, step in cases(device):
        step()
        gc.collect()
        peaks[name] = peak_bytes(step, device)
    return peaks


def run(report) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, several threads time the machine's load instead
    try:
        memory = (peak_memory(device) if device.type == "cuda"
                  else child_peak_memory("bench.bench_masked", "all"))
        steps = cases(device)
        medians = interleaved_medians(steps, device, ROUNDS)
        base = medians[steps[0][0]]
        for name, _ in steps:
            t = medians[name]
            report.add(SECTION, name, device=device.type, B=BATCH, median_ms=1000 * t,
                       share=t / base, peak_MiB=memory[name] / 2**20,
                       memory_share=memory[name] / memory[steps[0][0]],
                       goal="~0.25" if "visible" in name else "")
        visible = medians[steps[1][0]]
        report.note(f"masked: the encoder on the visible 25% of the tokens takes {visible / base:.2f} "
                    f"of its time on all tokens ({1000 * visible:.1f} ms against {1000 * base:.1f} "
                    f"ms, {device.type}); peak memory {memory[steps[1][0]] / memory[steps[0][0]]:.2f}")
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--memory"]:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.set_num_threads(1)
        print(json.dumps(peak_memory(device)))
        return 0
    from rich.console import Console

    from bench.__main__ import Report

    report = Report()
    run(report)
    report.render(Console())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
