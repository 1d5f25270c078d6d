"""Clustering quality of embeddings: k-means (faiss), NMI, AMI and the pairwise F1 used by MIC.

NMI comes in the two normalisations found in the literature: the arithmetic mean of the entropies
(scikit-learn >= 0.22, the default here) and their geometric mean (scikit-learn <= 0.21, which the 2019 deep
metric learning papers, MIC among them, ran with). Both are computed here from the contingency table, so
scikit-learn is not needed at runtime.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from objretrieval._validation import check_choice, check_embeddings, check_labels, check_positive_int

NMIAverage = Literal["arithmetic", "geometric"]


def kmeans(
    x: Any,
    num_clusters: int,
    *,
    niter: int = 20,
    seed: int = 1234,
    min_points_per_centroid: int = 1,
    max_points_per_centroid: int = 1_000_000_000,
    nredo: int = 1,
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with faiss, configured as MIC's evaluation (and by default every DML paper's NMI).

    Args:
        x: (N, D) embeddings.
        num_clusters: number of centroids, at most N.
        niter: Lloyd iterations.
        seed: faiss's random seed (its default).
        min_points_per_centroid: below this faiss warns; 1 silences it as MIC does.
        max_points_per_centroid: above this faiss subsamples; the default trains on every point.
        nredo: independent runs (different initialisations); the one with the lowest objective is kept.

    Returns:
        ``(assignment, centroids)``: (N,) int64 nearest-centroid index and (num_clusters, D) float32.
    """
    import faiss

    t = check_embeddings(x, "x")
    num_clusters = check_positive_int(num_clusters, "num_clusters")
    niter = check_positive_int(niter, "niter")
    seed = check_positive_int(seed, "seed", minimum=0)
    if num_clusters > t.shape[0]:
        raise ValueError(f"num_clusters={num_clusters} exceeds the number of points ({t.shape[0]})")
    data = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
    dim = data.shape[1]
    clustering = faiss.Clustering(dim, num_clusters)
    clustering.niter = niter
    clustering.seed = seed
    clustering.min_points_per_centroid = min_points_per_centroid
    clustering.max_points_per_centroid = max_points_per_centroid
    clustering.nredo = check_positive_int(nredo, "nredo")
    clustering.train(data, faiss.IndexFlatL2(dim))
    centroids = faiss.vector_float_to_array(clustering.centroids).reshape(num_clusters, dim)
    index = faiss.IndexFlatL2(dim)
    index.add(centroids)
    _, assignment = index.search(data, 1)
    return torch.from_numpy(assignment[:, 0].astype(np.int64)), torch.from_numpy(centroids.copy())


def _contingency(pred: Any, labels: Any) -> np.ndarray:
    """(num_classes, num_clusters) int64 co-occurrence counts."""
    y = check_labels(labels, "labels").numpy()
    c = check_labels(pred, "pred", length=len(y), length_of="labels").numpy()
    if len(y) == 0:
        raise ValueError("labels is empty")
    _, y_idx = np.unique(y, return_inverse=True)
    _, c_idx = np.unique(c, return_inverse=True)
    table = np.zeros((y_idx.max() + 1, c_idx.max() + 1), dtype=np.int64)
    np.add.at(table, (y_idx, c_idx), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0].astype(np.float64)
    total = p.sum()
    return float(-np.sum((p / total) * (np.log(p) - np.log(total))))


def _mutual_info(table: np.ndarray) -> float:
    """Mutual information (nats) of a contingency table, float64 rounding noise clipped to 0 as scikit-learn."""
    total = table.sum()
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    nz_r, nz_c = np.nonzero(table)
    n = table[nz_r, nz_c].astype(np.float64)
    outer = rows[nz_r].astype(np.float64) * cols[nz_c].astype(np.float64)
    terms = (n / total) * (np.log(n) - np.log(total)) + (n / total) * (np.log(total) * 2 - np.log(outer))
    return max(float(np.where(np.abs(terms) < np.finfo(np.float64).eps, 0.0, terms).sum()), 0.0)


def _normaliser(table: np.ndarray, average: NMIAverage) -> float:
    h_labels, h_pred = _entropy(table.sum(axis=1)), _entropy(table.sum(axis=0))
    return (h_labels + h_pred) / 2 if average == "arithmetic" else float(np.sqrt(h_labels * h_pred))


def normalized_mutual_info(pred: Any, labels: Any, average: NMIAverage = "arithmetic") -> float:
    """Normalised mutual information between a clustering and the class labels.

    Args:
        pred: (N,) cluster id per item.
        labels: (N,) class label per item.
        average: ``"arithmetic"`` (MI / mean of the entropies; scikit-learn >= 0.22) or ``"geometric"``
            (MI / sqrt of their product; scikit-learn <= 0.21, as in the 2019 DML papers).

    Returns:
        NMI in [0, 1]; 1.0 when both partitions are a single group, as scikit-learn defines it.
    """
    check_choice(average, "average", NMIAverage)
    table = _contingency(pred, labels)
    if table.shape[0] == table.shape[1] == 1:
        return 1.0
    if table.shape[0] == 1 or table.shape[1] == 1:  # one side is a single group: no information shared
        return 0.0
    mi = _mutual_info(table)
    if mi == 0.0:
        return 0.0
    return mi / max(_normaliser(table, average), np.finfo(np.float64).eps)


def _expected_mutual_info(table: np.ndarray) -> float:
    """E[MI] of two random partitions with the table's group sizes (Vinh et al. 2010, hypergeometric model).

    The expectation depends on the sizes only, so each distinct (class size, cluster size) pair is summed once,
    weighted by how often it occurs; the sum over the cell count n_ij is vectorised in log space.
    """
    n = float(table.sum())
    sizes_a, mult_a = np.unique(table.sum(axis=1), return_counts=True)
    sizes_b, mult_b = np.unique(table.sum(axis=0), return_counts=True)
    b = torch.from_numpy(sizes_b.astype(np.float64))[:, None]
    weight_b = torch.from_numpy(mult_b.astype(np.float64))[:, None]
    emi = 0.0
    for a, weight_a in zip(sizes_a.tolist(), mult_a.tolist(), strict=True):
        nij = torch.arange(1, min(a, int(sizes_b.max())) + 1, dtype=torch.float64)[None, :]
        valid = (nij >= a + b - n) & (nij <= b.clamp(max=a))
        log_p = (  # log P(n_ij) under the hypergeometric distribution, factorials as lgamma
            math.lgamma(a + 1)
            + math.lgamma(n - a + 1)
            - math.lgamma(n + 1)
            + torch.lgamma(b + 1)
            + torch.lgamma(n - b + 1)
            - torch.lgamma(nij + 1)
            - torch.lgamma((a - nij).clamp(min=0) + 1)
            - torch.lgamma((b - nij).clamp(min=0) + 1)
            - torch.lgamma((n - a - b + nij).clamp(min=0) + 1)
        )
        term = nij / n * (math.log(n / a) + torch.log(nij) - torch.log(b)) * torch.exp(log_p)
        emi += weight_a * float((torch.where(valid, term, 0.0) * weight_b).sum())
    return emi


def adjusted_mutual_info(pred: Any, labels: Any, average: NMIAverage = "arithmetic") -> float:
    """Adjusted mutual information: MI corrected for the agreement expected by chance.

    ``(MI - E[MI]) / (mean(H(labels), H(pred)) - E[MI])`` with the arithmetic (scikit-learn's default) or
    geometric mean of the entropies; the same value as ``sklearn.metrics.adjusted_mutual_info_score``.

    Args:
        pred: (N,) cluster id per item.
        labels: (N,) class label per item.
        average: normalisation, as for :func:`normalized_mutual_info`.

    Returns:
        AMI, at most 1 and about 0 for a random clustering (it can be negative); 1.0 when both partitions are a
        single group, 0.0 when only one is.
    """
    check_choice(average, "average", NMIAverage)
    table = _contingency(pred, labels)
    if table.shape[0] == table.shape[1] == 1:
        return 1.0
    if table.shape[0] == 1 or table.shape[1] == 1:
        return 0.0
    mi, emi = _mutual_info(table), _expected_mutual_info(table)
    eps = np.finfo(np.float64).eps
    # Keep the sign of numerator and denominator away from 0/0 (a perfect match: MI = max = E[MI]).
    denominator, numerator = _normaliser(table, average) - emi, mi - emi
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    numerator = min(numerator, -eps) if numerator < 0 else max(numerator, eps)
    return numerator / denominator


def pairwise_f1(pred: Any, labels: Any) -> float:
    """Pairwise F-measure of a clustering against the classes (MIC's and HDML's "F1").

    Over all pairs of items: precision = same-class pairs in the same cluster / same-cluster pairs, recall =
    the same / same-class pairs. Depends only on the partitions. Returns 1.0 when neither partition groups
    any pair (they agree trivially) and 0.0 when only one does.
    """
    table = _contingency(pred, labels)

    def pairs(n: np.ndarray) -> float:
        n = n.astype(np.float64)
        return float((n * (n - 1) / 2).sum())

    together = pairs(table)
    same_class, same_cluster = pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    if same_class == 0 and same_cluster == 0:
        return 1.0
    return 2 * together / (same_class + same_cluster)
