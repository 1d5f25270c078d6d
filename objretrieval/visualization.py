"""Pictures of retrieval results and model explanations.

matplotlib is optional and imported on use (``pip install objretrieval[examples]``). Every function returns
the matplotlib figure and saves it where ``path`` points (PNG, PDF... by extension); close the figure
(``plt.close(fig)``) when drawing many in a loop.

Images are (N, C, H, W) or (N, H, W) tensors (or numpy arrays) with C in (1, 3), or lists of image file paths
(read with Pillow, which matplotlib requires). uint8 images are read as 0..255; float images within [0, 1]
are shown as they are, any other float image is min-max scaled on its own (so normalised inputs display too).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from objretrieval._validation import (
    check_finite_values,
    check_index_range,
    check_labels,
    check_positive_int,
    to_tensor,
)
from objretrieval.metrics.evaluator import RetrievalResult
from objretrieval.models.avsl import AVSLExplanation

if TYPE_CHECKING:
    from objretrieval.models.mile import MILE

PathLike = str | os.PathLike[str]
#: A batch of images: (N, C, H, W) / (N, H, W) tensor or array, or a list of image file paths.
Images = Tensor | np.ndarray | Sequence[PathLike]

_EXTRA = "pip install objretrieval[examples]"
_RIGHT, _WRONG, _NEUTRAL = "green", "red", "black"


def _pyplot() -> Any:
    """matplotlib.pyplot, or an ImportError that names the extra to install."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(f"objretrieval.visualization needs matplotlib: {_EXTRA}") from err
    return plt


def _finish(fig: Any, path: PathLike | None) -> Any:
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def _to_unit_range(x: Tensor) -> np.ndarray:
    """A (C, H, W) image -> (H, W) or (H, W, 3) float array in [0, 1] (see the module docstring)."""
    y = x.detach().float().cpu()
    if x.dtype == torch.uint8:
        y = y / 255
    else:
        low, high = float(y.min()), float(y.max())
        if low < -1e-3 or high > 1 + 1e-3:  # not a [0, 1] image (up to interpolation overshoot): stretch it
            y = (y - low) / max(high - low, 1e-12)
    y = y.clamp(0, 1)
    return y[0].numpy() if y.shape[0] == 1 else y.permute(1, 2, 0).numpy()


class _ImageBatch:
    """Validated images, converted to displayable arrays one at a time (only those that are drawn)."""

    def __init__(self, images: Any, name: str) -> None:
        self.name = name
        self.paths: list[Path] | None = None
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], (str, os.PathLike)):
            self.paths = [Path(p) for p in images]
            for i, p in enumerate(self.paths):
                if not p.is_file():
                    raise FileNotFoundError(f"{name}[{i}] is not a file: {p}")
            return
        t = to_tensor(images, name)
        if t.ndim == 3:
            t = t[:, None]
        if t.ndim != 4 or t.shape[1] not in (1, 3) or t.shape[0] == 0:
            raise ValueError(
                f"{name} must be (N, C, H, W) with N >= 1 and C in (1, 3), (N, H, W) or a list of image paths, "
                f"got shape {tuple(t.shape)}"
            )
        if t.dtype != torch.uint8 and not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be uint8 or floating point, got {t.dtype}")
        if t.dtype.is_floating_point:
            check_finite_values(t.flatten(1), name)
        self.tensor = t

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else self.tensor.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        if self.paths is None:
            return _to_unit_range(self.tensor[i])
        from PIL import Image  # a dependency of matplotlib

        with Image.open(self.paths[i]) as image:
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def _one_image(image: Any, name: str) -> np.ndarray:
    """A single (C, H, W) / (H, W) image or image path, displayable."""
    if isinstance(image, (str, os.PathLike)):
        return _ImageBatch([image], name)[0]
    t = to_tensor(image, name)
    if t.ndim not in (2, 3):
        raise ValueError(f"{name} must be one image, (C, H, W) or (H, W), got shape {tuple(t.shape)}")
    return _ImageBatch(t[None], name)[0]


def _show(
    ax: Any, image: np.ndarray, *, cmap: str = "gray", frame: str | None = None, title: str = ""
) -> None:
    """Draw an image without ticks, in a coloured frame if asked."""
    ax.imshow(image, cmap=cmap if image.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if frame is not None:
        for spine in ax.spines.values():
            spine.set_edgecolor(frame)
            spine.set_linewidth(3)
    if title:
        ax.set_title(title, fontsize=8)


def _blank(ax: Any) -> None:
    ax.axis("off")


def _index_row(x: Any, name: str, high: int) -> Tensor:
    """A 1-D sequence of gallery indices in [0, high)."""
    t = to_tensor(x, name)
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{name} must hold integer gallery indices, got dtype {t.dtype}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (depth,), got shape {tuple(t.shape)}")
    return check_index_range(t.to(device="cpu", dtype=torch.int64), name, high=high)


def draw_neighbours(
    query_images: Images,
    gallery_images: Images,
    neighbors_or_indices: Any,
    *,
    query_labels: Any = None,
    gallery_labels: Any = None,
    k: int | None = None,
    titles: Sequence[str] | None = None,
    title: str | None = None,
    cmap: str = "gray",
    path: PathLike | None = None,
) -> Any:
    """Draw each query (left column) and its nearest gallery images, best first.

    With labels, each neighbour gets a green frame when it shares the query's label and a red one otherwise.
    Missing slots of an approximate search (index -1) are left empty.

    Args:
        query_images: the Q queries (see the module docstring for image formats).
        gallery_images: the gallery the neighbours index.
        neighbors_or_indices: a :class:`~objretrieval.search.Neighbors` (from :func:`~objretrieval.knn`) or
            a (Q, depth) integer array of gallery indices.
        query_labels: (Q,) integer labels; give both label arguments or neither.
        gallery_labels: (G,) integer labels.
        k: neighbours to draw per query (default all columns of ``neighbors_or_indices``).
        titles: one row label per query (default ``"query <label>"``, or ``"query <index>"`` without labels).
        title: the figure's title.
        cmap: colour map of single-channel images (e.g. ``"gray_r"`` for dark strokes on white).
        path: if given, save the figure there.

    Returns:
        The matplotlib figure: Q rows of 1 + k axes.
    """
    plt = _pyplot()
    queries = _ImageBatch(query_images, "query_images")
    gallery = _ImageBatch(gallery_images, "gallery_images")
    indices = neighbors_or_indices
    if not isinstance(indices, (Tensor, np.ndarray)) and hasattr(indices, "indices"):  # Neighbors-like
        indices = indices.indices
    idx = to_tensor(indices, "neighbors_or_indices")
    if idx.dtype == torch.bool or idx.dtype.is_floating_point or idx.ndim != 2 or len(idx) != len(queries):
        raise ValueError(
            f"neighbors_or_indices must be Neighbors or a ({len(queries)}, depth) integer array of gallery "
            f"indices, one row per query, got {idx.dtype} of shape {tuple(idx.shape)}"
        )
    idx = check_index_range(
        idx.to(device="cpu", dtype=torch.int64), "neighbors_or_indices", low=-1, high=len(gallery)
    )
    k = idx.shape[1] if k is None else check_positive_int(k, "k")
    if k > idx.shape[1]:
        raise ValueError(f"k={k} exceeds the {idx.shape[1]} neighbours given per query")
    if (query_labels is None) != (gallery_labels is None):
        raise ValueError("pass both query_labels and gallery_labels, or neither")
    q_labels = g_labels = None
    if query_labels is not None:
        q_labels = check_labels(query_labels, "query_labels", len(queries), "query_images")
        g_labels = check_labels(gallery_labels, "gallery_labels", len(gallery), "gallery_images")
    if titles is None:
        titles = [f"query {int(q_labels[q]) if q_labels is not None else q}" for q in range(len(queries))]
    elif isinstance(titles, str) or len(titles) != len(queries):
        raise ValueError(f"titles must be a sequence of {len(queries)} strings, one per query")

    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.4 * (k + 1), 1.4 * len(queries)), squeeze=False)
    for q in range(len(queries)):
        _show(axes[q, 0], queries[q], cmap=cmap, frame=_NEUTRAL)
        axes[q, 0].set_ylabel(titles[q])
        for col, g in enumerate(idx[q, :k].tolist(), start=1):
            if g < 0:
                _blank(axes[q, col])
                continue
            frame = None
            if q_labels is not None and g_labels is not None:
                frame = _RIGHT if g_labels[g] == q_labels[q] else _WRONG
            _show(axes[q, col], gallery[g], cmap=cmap, frame=frame)
    axes[0, 0].set_title("query")
    for col in range(1, k + 1):
        axes[0, col].set_title(f"#{col}")
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


_RECALL = re.compile(r"recall@(\d+)")


def _recall_curve(name: str, result: Any) -> dict[int, float]:
    """K -> Recall@K of one model, from a RetrievalResult (its ``recall@K`` metrics) or a mapping."""
    if isinstance(result, RetrievalResult):
        curve = {int(m[1]): v for key, v in result.metrics.items() if (m := _RECALL.fullmatch(key))}
    elif isinstance(result, Mapping):
        curve = dict(result)
    else:
        raise TypeError(
            f"results[{name!r}] must be a RetrievalResult or a mapping K -> recall, got {type(result).__name__}"
        )
    if not curve:
        raise ValueError(f"results[{name!r}] has no recall@K values")
    for key, value in curve.items():
        check_positive_int(key, f"the K of results[{name!r}]")
        if not 0 <= float(value) <= 1:  # also refuses NaN
            raise ValueError(f"results[{name!r}][{key}] must be a recall in [0, 1], got {value}")
    return {int(key): float(value) for key, value in sorted(curve.items())}


def plot_recall_at_k(
    results: Mapping[str, RetrievalResult | Mapping[int, float]],
    *,
    ks: Sequence[int] | None = None,
    title: str = "Recall@K",
    path: PathLike | None = None,
) -> Any:
    """Plot Recall@K against K (log scale) for several models.

    Args:
        results: model name -> its :class:`~objretrieval.metrics.RetrievalResult` (its ``recall@K``
            metrics are read) or a mapping K -> recall in [0, 1].
        ks: the K to plot (default every K of each model); each model must have them all.
        title: the axes' title.
        path: if given, save the figure there.

    Returns:
        The matplotlib figure (one axes, one line per model, recall in percent).
    """
    plt = _pyplot()
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping of model name -> recall values")
    curves = {name: _recall_curve(name, result) for name, result in results.items()}
    if ks is not None:
        ks = sorted({check_positive_int(k, "ks") for k in ks})
        if not ks:
            raise ValueError("ks must not be empty")
        for name, curve in curves.items():
            if absent := [k for k in ks if k not in curve]:
                raise ValueError(f"results[{name!r}] has no recall@K for K in {absent}")
        curves = {name: {k: curve[k] for k in ks} for name, curve in curves.items()}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in curves.items():
        ax.plot(list(curve), [100 * v for v in curve.values()], marker="o", label=name)
    all_ks = sorted(set().union(*curves.values()))
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_ks, [str(k) for k in all_ks])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _finish(fig, path)


def draw_reranking(
    query_image: Any,
    gallery_images: Images,
    before: Any,
    after: Any,
    *,
    relevant: Any = None,
    k: int = 8,
    cmap: str = "gray",
    title: str | None = None,
    path: PathLike | None = None,
) -> Any:
    """Draw one query's shortlist before and after reranking (e.g. by AMES), relevant items marked.

    Top row: the global-descriptor order; bottom row: the reranked order, each image titled with its rank
    in the shortlist before (``was #r``).

    Args:
        query_image: the query, (C, H, W), (H, W) or an image path.
        gallery_images: the gallery the rankings index.
        before: (depth,) gallery indices in the global shortlist's order (e.g. a row of ``Neighbors.indices``).
        after: (depth,) gallery indices in the reranked order.
        relevant: gallery indices relevant to the query, or a (G,) bool mask; relevant images get a green
            frame, the others a red one. None draws no frames.
        k: images per row (at most the rankings' depth).
        cmap: colour map of single-channel images.
        title: the figure's title.
        path: if given, save the figure there.

    Returns:
        The matplotlib figure: 2 rows of 1 + k axes (the query, then the ranking).
    """
    plt = _pyplot()
    query = _one_image(query_image, "query_image")
    gallery = _ImageBatch(gallery_images, "gallery_images")
    rows = {
        "before": _index_row(before, "before", len(gallery)),
        "after": _index_row(after, "after", len(gallery)),
    }
    k = check_positive_int(k, "k")
    k = min(k, *(len(r) for r in rows.values()))
    if k == 0:
        raise ValueError("before and after must not be empty")
    is_relevant = None
    if relevant is not None:
        r = to_tensor(relevant, "relevant").cpu()
        if r.dtype == torch.bool:
            if r.shape != (len(gallery),):
                raise ValueError(f"a bool relevant must be ({len(gallery)},), got shape {tuple(r.shape)}")
            is_relevant = r
        else:
            ids = _index_row(r, "relevant", len(gallery))
            is_relevant = torch.zeros(len(gallery), dtype=torch.bool)
            is_relevant[ids] = True
    rank_before = {g: rank for rank, g in reversed(list(enumerate(rows["before"].tolist(), start=1)))}

    fig, axes = plt.subplots(2, k + 1, figsize=(1.5 * (k + 1), 3.6), squeeze=False)
    for row, (name, ranking) in enumerate(zip(("global", "reranked"), rows.values(), strict=True)):
        _show(axes[row, 0], query, cmap=cmap, frame=_NEUTRAL, title="query")
        axes[row, 0].set_ylabel(name)
        for col, g in enumerate(ranking[:k].tolist(), start=1):
            frame = None if is_relevant is None else (_RIGHT if is_relevant[g] else _WRONG)
            caption = f"#{col}" if row == 0 else f"#{col} (was #{rank_before.get(g, '-')})"
            _show(axes[row, col], gallery[g], cmap=cmap, frame=frame, title=caption)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


def _set_steps(model: MILE, images: Tensor) -> Tensor:
    """(N, D) MILE set embedding after each of N images, built with the incremental API (one image at a time)."""
    latent = None
    steps = []
    with torch.no_grad():
        for t in range(images.shape[0]):
            latent = model.update(latent, images[t : t + 1])
            steps.append(latent[0])
    return torch.stack(steps)


def _references(references: Any, steps: Tensor) -> dict[str, Tensor]:
    """name -> (D,) finite reference embedding; the final step when ``references`` is None."""
    if references is None:
        return {"final embedding": steps[-1]}
    if not isinstance(references, Mapping) or not references:
        raise ValueError("references must be a non-empty mapping of curve name -> (D,) embedding")
    checked = {}
    for name, reference in references.items():
        label = f"references[{name!r}]"
        ref = to_tensor(reference, label).detach().float().cpu()
        if ref.shape != steps.shape[1:]:
            raise ValueError(f"{label} must be ({steps.shape[1]},), got shape {tuple(ref.shape)}")
        check_finite_values(ref, label)
        checked[str(name)] = ref
    return checked


def plot_set_embedding(
    images: Images | None = None,
    *,
    model: MILE | None = None,
    steps: Any = None,
    references: Mapping[str, Any] | None = None,
    cmap: str = "gray",
    title: str = "MILE set embedding as images are added",
    path: PathLike | None = None,
) -> Any:
    """Plot how a MILE set embedding moves as the images of a set are added one by one.

    Each curve is the cosine similarity of the running set embedding (after images 1..t) to one reference
    embedding, e.g. the same object's embedding from other photos and another object's; by default the final
    step (all images), so the curve ends at 1. Cosine rather than MILE's raw inner product keeps the scale
    readable. The images are shown as thumbnails under the x-axis, in feed order.

    Give either ``model`` with ``images`` (the embeddings are built with :meth:`~objretrieval.models.MILE.update`,
    without gradients and in the model's current mode), or ``steps``, precomputed embeddings (e.g.
    ``model(images[None], return_steps=True)[0]``), with optional ``images`` for the thumbnails.

    Args:
        images: the set's N images in feed order: the model's (N, 3, H, W) input with ``model``, any image
            batch of the module's formats for the thumbnails with ``steps``.
        model: a :class:`~objretrieval.models.MILE`.
        steps: (N, D) set embedding after each image.
        references: curve name (the legend) -> (D,) embedding to compare with; default the final step.
        cmap: colour map of single-channel thumbnails.
        title: the curves' title.
        path: if given, save the figure there.

    Returns:
        The matplotlib figure: the curves' axes (one line per reference, in the mapping's order), then one
        axes per thumbnail.
    """
    plt = _pyplot()
    if (model is None) == (steps is None):
        raise ValueError("pass exactly one of model (with images) and steps")
    if model is not None:
        if images is None:
            raise ValueError("images are required with model")
        pixels = to_tensor(images, "images")
        if pixels.ndim != 4 or pixels.shape[0] == 0:
            raise ValueError(
                f"images must be (N, 3, H, W) with N >= 1 for model, got shape {tuple(pixels.shape)}"
            )
        steps = _set_steps(model, pixels)
    e = to_tensor(steps, "steps").detach().float().cpu()
    if e.ndim != 2 or e.shape[0] == 0:
        raise ValueError(f"steps must be (N, D) with N >= 1, got shape {tuple(e.shape)}")
    check_finite_values(e, "steps")
    refs = _references(references, e)
    thumbs = None if images is None else _ImageBatch(images, "images")
    if thumbs is not None and len(thumbs) != len(e):
        raise ValueError(f"images has {len(thumbs)} images but steps has {len(e)} rows")

    n = len(e)
    fig = plt.figure(figsize=(max(4.5, 0.9 * n), 3.8 if thumbs is not None else 3.0))
    grid = fig.add_gridspec(
        2 if thumbs is not None else 1, n, height_ratios=[3, 1] if thumbs is not None else None
    )
    ax = fig.add_subplot(grid[0, :])
    positions = list(range(1, n + 1))
    for name, ref in refs.items():
        ax.plot(positions, F.cosine_similarity(e, ref[None], dim=1).numpy(), marker="o", label=name)
    ax.set_xlim(0.5, n + 0.5)
    ax.set_xticks(positions)
    ax.set_xlabel("images in the set")
    ax.set_ylabel("cosine similarity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if thumbs is not None:
        for t in range(n):
            _show(fig.add_subplot(grid[1, t]), thumbs[t], cmap=cmap)
    return _finish(fig, path)


def _overlay(ax: Any, image: np.ndarray, cam: Tensor, title: str) -> None:
    """Show ``image`` (H, W) or (H, W, 3) with the activation map ``cam`` (h, w) upsampled over it."""
    h, w = image.shape[:2]
    heat = F.interpolate(cam[None, None].float().cpu(), size=(h, w), mode="bilinear", align_corners=False)[
        0, 0
    ]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
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
    path: PathLike | None = None,
) -> Any:
    """Draw which attributes make two images similar under AVSL.

    One row per top-level node of :meth:`~objretrieval.models.AVSLExplanation.top_nodes` (attributes the two
    images agree on and the model trusts): the node's activation map on both images, then the lower-level node it
    leans on most, on both images. Row titles give the corrected and raw distance of the node and how much
    it trusted itself (reliability P).

    Args:
        explanation: from :meth:`objretrieval.models.AVSL.explain`.
        image_a: the pair's first image, (C, H, W) (see the module docstring for value ranges).
        image_b: its second image.
        pair: which pair of the explanation to draw.
        num_nodes: rows to draw.
        path: if given, save the figure there (PNG, PDF... by extension).

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    top = len(explanation.propagated) - 1
    if not 0 <= pair < explanation.distance.shape[0]:
        raise ValueError(f"pair must lie in [0, {explanation.distance.shape[0]}), got {pair}")
    a, b = _one_image(image_a, "image_a"), _one_image(image_b, "image_b")
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
    return _finish(fig, path)


__all__ = [
    "draw_avsl_explanation",
    "draw_neighbours",
    "draw_reranking",
    "plot_recall_at_k",
    "plot_set_embedding",
]
