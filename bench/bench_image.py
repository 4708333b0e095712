"""Image-quality objectives: ``ms_ssim_loss`` against torchmetrics' MS-SSIM on identical images.

Forward + backward of ``1 - MS-SSIM(x, y)`` (five scales, Wang et al.'s weights, an 11-tap
Gaussian window of sigma 1.5, data range 1) with respect to ``x``, for ``B`` pairs of
``C x H x W`` float32 images: the ``ms_ssim_loss`` objective, then torchmetrics'
``multiscale_structural_similarity_index_measure`` (the reference; skipped when torchmetrics is
not installed). Median over interleaved rounds, one CPU thread, after a warm-up call each; the
ratio is ours over the reference (goal <= 1.0). The two differ by design at the borders
(torchmetrics averages its SSIM map over reflection-padded positions; Wang et al. and this
objective over the valid ones), not in the work per pixel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.measure import interleaved_medians

SECTION = "Image quality: ms_ssim_loss vs torchmetrics' MS-SSIM (forward + backward)"
SHAPE = (8, 3, 192, 192)
ROUNDS = 7


def cases(device: torch.device) -> list[tuple[str, Callable[[], None]]]:
    import sdk

    g = torch.Generator().manual_seed(0)
    y = torch.rand(SHAPE, generator=g)
    x0 = (y + 0.1 * torch.randn(SHAPE, generator=g)).clamp(0, 1)
    x, y = x0.flatten(1).to(device).requires_grad_(), y.to(device)  # flat rows, as a decoder's
    objective = sdk.create("objective", "ms_ssim_loss", image_shape=SHAPE[1:])
    views = sdk.Views(embeddings=(x,))
    batch = sdk.Batch(extras={sdk.keys.INPUT: y})

    def ours() -> None:
        x.grad = None
        objective(views, batch).value.backward()

    steps = [("ms_ssim_loss", ours)]
    try:
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure
    except ImportError:
        return steps

    def reference() -> None:
        x.grad = None
        (1 - multiscale_structural_similarity_index_measure(x.view(SHAPE), y, data_range=1.0)).backward()

    return [*steps, ("torchmetrics MS-SSIM", reference)]


def run(report) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, several threads time the machine's load instead
    try:
        medians = interleaved_medians(cases(device), device, ROUNDS)
        reference = medians.get("torchmetrics MS-SSIM")
        for name, t in medians.items():
            report.add(SECTION, name, device=device.type, shape="x".join(map(str, SHAPE)),
                       median_ms=1000 * t, ratio=t / reference if reference else "",
                       goal="<= 1.0" if name == "ms_ssim_loss" and reference else "")
        if reference:
            report.note(f"image: ms_ssim_loss forward + backward {medians['ms_ssim_loss'] / reference:.2f}x "
                        f"torchmetrics' MS-SSIM ({1000 * medians['ms_ssim_loss']:.0f} ms against "
                        f"{1000 * reference:.0f} ms, {device.type}, {'x'.join(map(str, SHAPE))})")
        else:
            report.note("image: torchmetrics is not installed; ms_ssim_loss timed alone")
    finally:
        torch.set_num_threads(threads)
