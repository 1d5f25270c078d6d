"""Block-wise similarity scores, always in float32 and always "higher is better".

Internally every metric is turned into a score to maximise: cosine and inner product as they are, L2 as the
negative squared Euclidean distance. Half-precision inputs are upcast before the matrix product so that sums
accumulate in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from objretrieval.search.sources import BlockSource

Metric = Literal["cosine", "ip", "l2"]
METRICS: tuple[str, ...] = ("cosine", "ip", "l2")


@dataclass(frozen=True)
class Prepared:
    """Vectors ready for scoring: float32 on the compute device, normalised for cosine, norms for L2."""

    vectors: Tensor
    sq_norms: Tensor | None

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def rows(self, start: int, stop: int) -> Prepared:
        sq = None if self.sq_norms is None else self.sq_norms[start:stop]
        return Prepared(self.vectors[start:stop], sq)


def prepare(x: Tensor, metric: Metric, device: torch.device) -> Prepared:
    x = x.to(device=device, dtype=torch.float32)
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    sq = x.pow(2).sum(1) if metric == "l2" else None
    return Prepared(x, sq)


def score_block(q: Prepared, g: Prepared, metric: Metric, out: Tensor | None = None) -> Tensor:
    """(len(q), len(g)) float32 scores, higher is better; for L2, minus the squared distance.

    ``out`` is an optional buffer of at least that many elements, reused across blocks: writing into warm
    memory instead of a fresh allocation avoids page faults that cost about a fifth of the product's time.
    """
    shape = (len(q), len(g))
    buffer = (
        out[: shape[0] * shape[1]].view(shape)
        if out is not None and out.numel() >= shape[0] * shape[1]
        else None
    )
    if metric != "l2":
        return torch.mm(q.vectors, g.vectors.T, out=buffer)
    assert q.sq_norms is not None and g.sq_norms is not None
    # -|q - g|^2 = 2 q.g - |g|^2 - |q|^2: the gallery term rides in the GEMM as a bias; one pass adds |q|^2.
    s = torch.addmm(-g.sq_norms, q.vectors, g.vectors.T, alpha=2.0, out=buffer)
    return s.sub_(q.sq_norms[:, None])


def to_user_scores(internal: Tensor, metric: Metric) -> Tensor:
    """Turn internal scores into what the API returns: similarities, or squared distances (>= 0) for L2."""
    return (-internal).clamp_(min=0.0) if metric == "l2" else internal


def mask_excluded(scores: Tensor, exclude: Tensor | None, row_start: int, col_offset: int) -> None:
    """Set ``scores[r, exclude[row_start + r] - col_offset]`` to -inf where that column lies in the block."""
    if exclude is None:
        return
    ex = exclude[row_start : row_start + scores.shape[0]]
    hit = (ex >= col_offset) & (ex < col_offset + scores.shape[1])
    if bool(hit.any()):
        rows = hit.nonzero().squeeze(1)
        scores[rows, ex[rows] - col_offset] = float("-inf")


def iter_scores(
    queries: Prepared,
    gallery: BlockSource,
    metric: Metric,
    *,
    device: torch.device,
    query_block_size: int,
    exclude: Tensor | None = None,
    progress: bool = False,
    desc: str = "search",
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(row_start, col_offset, scores)`` over all query blocks x gallery blocks.

    The gallery is the outer loop, so every gallery row is read (from disk, if it lives there) exactly once.
    Excluded (query, gallery) pairs score -inf. The yielded tensor is a reused buffer: consume it before the
    next step.
    """
    buffer = torch.empty(min(query_block_size, len(queries)) * gallery.block_size, device=device)
    total = None if gallery.num_rows is None else -(-gallery.num_rows // gallery.block_size)
    for col_offset, block in tqdm(
        gallery.blocks(), total=total, disable=not progress, desc=desc, unit="block"
    ):
        g = prepare(block, metric, device)
        for row_start in range(0, len(queries), query_block_size):
            s = score_block(queries.rows(row_start, row_start + query_block_size), g, metric, out=buffer)
            mask_excluded(s, exclude, row_start, col_offset)
            yield row_start, col_offset, s
