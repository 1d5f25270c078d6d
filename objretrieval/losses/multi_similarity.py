"""Multi-similarity loss (Wang et al., CVPR 2019)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from objretrieval._validation import check_choice, check_number
from objretrieval.batch import LabelComparison
from objretrieval.kernels.dispatch import KernelBackend
from objretrieval.kernels.pairwise_losses import tiled_multi_similarity_loss, tiled_options
from objretrieval.losses.base import PairBatch, Reduction, masked_log1p_sum_exp, reduction_divisor
from objretrieval.losses.tiled import TiledPairLoss
from objretrieval.miners.multi_similarity import MultiSimilarityMiner


class MultiSimilarityLoss(TiledPairLoss):
    """``(1/alpha) log(1 + sum_pos e^{-alpha (S - base)}) + (1/beta) log(1 + sum_neg e^{beta (S - base)})``.

    Per anchor over its positive and negative pairs (the mined ones, with
    :class:`~objretrieval.miners.MultiSimilarityMiner`; mined triplets count as their a-p and a-n pairs),
    averaged over all anchors: an anchor with no pair contributes 0. Matches pytorch-metric-learning's
    ``MultiSimilarityLoss``.

    Args:
        alpha: positive-pair scale (> 0).
        beta: negative-pair scale (> 0).
        base: similarity offset, in [-1, 1].
        reduction: over anchors, ``"mean"`` (PML's default ``MeanReducer``), ``"mean_nonzero"`` (over the
            anchors with a positive loss) or ``"sum"``.
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix.
        mining_epsilon: mine inside the loss, as ``MultiSimilarityMiner(epsilon=mining_epsilon)`` would
            (among the pairs given, if ``indices_tuple`` restricts them); None: no mining (the default).
        backend: ``"torch"`` (the dense path unless ``tiled``), ``"triton"`` or ``"auto"``: the tiled path,
            O(N x tile_size) memory instead of the (N, N) similarities
            (:func:`~objretrieval.kernels.pairwise_losses.tiled_multi_similarity_loss`), which takes the plain
            batch only: no ``indices_tuple`` (mine with ``mining_epsilon``), ``ref_emb`` or
            ``label_comparison``.
        tiled: the tiled path with ``backend`` (``"torch"``: its torch tiles, any device).
        tile_size: rows per tile of the tiled path (None: its default).

    The defaults are PML's. Preset (:meth:`~objretrieval.losses.MetricLoss.from_preset`): ``"liao2023"``, the
    "MS+miner" baseline of Liao et al. (ICML 2023, 224 code ``MultiSimilarityLossWithMiner``): the same
    values, with ``MultiSimilarityMiner(epsilon=0.1)`` passed by the caller.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {"liao2023": {"alpha": 2.0, "beta": 50.0, "base": 0.5}}

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        *,
        reduction: Reduction = "mean",
        label_comparison: LabelComparison | None = None,
        mining_epsilon: float | None = None,
        backend: KernelBackend = "torch",
        tiled: bool = False,
        tile_size: int | None = None,
    ) -> None:
        super().__init__(label_comparison=label_comparison)
        self.alpha = check_number(alpha, "alpha", low=0.0, low_open=True)
        self.beta = check_number(beta, "beta", low=0.0, low_open=True)
        self.base = check_number(base, "base", low=-1.0, high=1.0)
        self.reduction: Reduction = check_choice(reduction, "reduction", Reduction)
        epsilon = None if mining_epsilon is None else check_number(mining_epsilon, "mining_epsilon", low=0.0)
        self.mining_epsilon = epsilon
        self.miner = None if epsilon is None else MultiSimilarityMiner(epsilon)
        self.backend, self.tiled, self.tile_size = tiled_options(backend, tiled, tile_size, label_comparison)

    def tiled_loss(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, bool]:
        return tiled_multi_similarity_loss(
            embeddings,
            labels,
            alpha=self.alpha,
            beta=self.beta,
            base=self.base,
            mining_epsilon=None if self.miner is None else self.miner.epsilon,
            reduction=self.reduction,
            tile_size=self.tile_size,
            backend=self.backend,
            return_empty=True,
        )

    def compute_loss(self, batch: PairBatch) -> Tensor | None:
        pos, neg = batch.positive_mask, batch.negative_mask
        if self.miner is not None:
            pos, neg = self.miner.mine(batch)
        if not bool(pos.any()) and not bool(neg.any()):
            return None
        s = batch.similarity
        pos_term = masked_log1p_sum_exp(-self.alpha * (s - self.base), pos) / self.alpha
        neg_term = masked_log1p_sum_exp(self.beta * (s - self.base), neg) / self.beta
        per_anchor = pos_term + neg_term
        divisor = reduction_divisor(self.reduction, (per_anchor > 0).sum(), per_anchor.shape[0])
        return per_anchor.sum() / divisor
