"""Pictures of model explanations (matplotlib, imported on use: ``pip install matplotlib``)."""

from __future__ import annotations

import os
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from objretrieval.models.avsl import AVSLExplanation


def _displayable(image: Tensor) -> Tensor:
    """(C, H, W) or (H, W) -> (H, W, 3) in [0, 1] (min-max scaled, so normalised inputs display too)."""
    x = image.detach().float().cpu()
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(
            f"images must be (C, H, W) with C in (1, 3) or (H, W), got shape {tuple(image.shape)}"
        )
    x = x.expand(3, -1, -1)
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    return x.permute(1, 2, 0)


def _overlay(ax: Any, image: Tensor, cam: Tensor, title: str) -> None:
    """Show ``image`` with the activation map ``cam`` (h, w) upsampled over it."""
    h, w = image.shape[:2]
    heat = F.interpolate(cam[None, None].float().cpu(), size=(h, w), mode="bilinear", align_corners=False)[
        0, 0
    ]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)
    ax.imshow(image.numpy())
    ax.imshow(heat.numpy(), cmap="jet", alpha=0.45)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def draw_avsl_explanation(
    explanation: AVSLExplanation,
    image_a: Tensor,
    image_b: Tensor,
    *,
    pair: int = 0,
    num_nodes: int = 4,
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """Draw which attributes make two images similar under AVSL.

    One row per top-level node of :meth:`~objretrieval.models.AVSLExplanation.top_nodes` (attributes the two
    images agree on and the model trusts): the node's activation map on both images, then the lower-level node it
    leans on most, on both images. Row titles give the corrected and raw distance of the node and how much
    it trusted itself (reliability P).

    Args:
        explanation: from :meth:`objretrieval.models.AVSL.explain`.
        image_a: the pair's first image, (C, H, W) (any value range).
        image_b: its second image.
        pair: which pair of the explanation to draw.
        num_nodes: rows to draw.
        path: if given, save the figure there (PNG, PDF... by extension).

    Returns:
        The matplotlib figure.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    top = len(explanation.propagated) - 1
    if not 0 <= pair < explanation.distance.shape[0]:
        raise ValueError(f"pair must lie in [0, {explanation.distance.shape[0]}), got {pair}")
    a, b = _displayable(image_a), _displayable(image_b)
    nodes = explanation.top_nodes(pair, num_nodes).tolist()
    fig, axes = plt.subplots(len(nodes), 4, figsize=(8, 2.2 * len(nodes)), squeeze=False)
    for row, node in enumerate(nodes):
        low = int(explanation.supporting_nodes(node, top, k=1)[0])
        weight = float(explanation.propagation_weights[top - 1][low, node])
        corrected = float(explanation.propagated[top][pair, node])
        raw = float(explanation.raw[top][pair, node])
        trust = float(explanation.reliability[top - 1][pair, node])
        cams_a, cams_b = explanation.activation_maps_a, explanation.activation_maps_b
        _overlay(axes[row, 0], a, cams_a[top][pair, node], f"A: node {node} (level {top})")
        _overlay(axes[row, 1], b, cams_b[top][pair, node], f"B: D^={corrected:.1e} D={raw:.1e} P={trust:.2f}")
        _overlay(axes[row, 2], a, cams_a[top - 1][pair, low], f"A: level-{top - 1} node {low}")
        _overlay(axes[row, 3], b, cams_b[top - 1][pair, low], f"B: link weight {weight:.2f}")
    fig.suptitle(f"AVSL distance {float(explanation.distance[pair]):.3f}", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


__all__ = ["draw_avsl_explanation"]
