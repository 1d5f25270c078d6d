"""MILE's AR@K: Recall@1..K averaged, per query class, for retrieving objects from sets of images."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from objretrieval._validation import check_labels, check_ranking, to_tensor


class AverageRecall(NamedTuple):
    """``recalls[r - 1]`` is the fraction of query classes covered within the top r; ``mean`` is AR@K."""

    recalls: Tensor
    mean: float


def average_recall_at_k(
    scores: Any | None, indices: Any, query_labels: Any, gallery_labels: Any, *, higher_is_better: bool = True
) -> AverageRecall:
    """AR@K as MILE reports it (K = the number of neighbour columns, 10 in the paper).

    For each query class c and rank r, c is covered at r if a gallery item of class c is among the top r.
    When a class has several query rows, each rank column uses the row with the best score at that rank (the
    first such row on ties), the official "max over queries" rule. With one query per class this is plain
    Recall@r per class.

    Args:
        scores: (Q, K) neighbour scores, as returned by :func:`objretrieval.search.knn`; may be None when
            every class has a single query row.
        indices: (Q, K) int64 gallery indices (-1 for missing results, never a hit).
        query_labels: (Q,) class of each query row.
        gallery_labels: (N,) class of each gallery item.
        higher_is_better: False when ``scores`` are distances.
    """
    idx = check_ranking(indices, "indices")
    ql = check_labels(query_labels, "query_labels", idx.shape[0], "indices")
    gl = check_labels(gallery_labels, "gallery_labels")
    if idx.numel() and int(idx.max()) >= gl.shape[0]:
        raise ValueError(
            f"indices refer to gallery item {int(idx.max())} but gallery_labels has {gl.shape[0]}"
        )
    if scores is None:
        if torch.unique(ql).numel() != ql.numel():
            raise ValueError("scores are needed to pick the best query of classes with several query rows")
        scores = -torch.arange(idx.shape[1], dtype=torch.float64).expand(idx.shape)
    s = to_tensor(scores, "scores").double()
    if s.shape != idx.shape:
        raise ValueError(f"scores has shape {tuple(s.shape)} but indices has {tuple(idx.shape)}")
    s, ql, gl = s.cpu(), ql.cpu(), gl.cpu()
    if not higher_is_better:
        s = -s
    num_queries, k = s.shape
    classes, cls = torch.unique(ql, return_inverse=True)
    group = cls[:, None].expand(num_queries, k)
    best = torch.full((classes.numel(), k), float("-inf"), dtype=torch.float64)
    best = best.scatter_reduce(0, group, s, reduce="amax")
    row_ids = torch.arange(num_queries)[:, None].expand(num_queries, k)
    candidates = torch.where(s == best[cls], row_ids, num_queries)
    chosen = torch.full((classes.numel(), k), num_queries).scatter_reduce(0, group, candidates, reduce="amin")
    picked = idx[chosen, torch.arange(k)]
    hit = (picked >= 0) & (gl[picked.clamp(min=0)] == classes[:, None])
    covered = hit.cumsum(dim=1) > 0
    recalls = covered.double().mean(dim=0)
    return AverageRecall(recalls, float(recalls.mean()))
