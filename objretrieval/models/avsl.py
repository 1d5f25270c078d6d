"""AVSL (Zhang et al., CVPR 2022): attributable visual similarity propagated across semantic levels.

Each ResNet stage l in (layer2, layer3, layer4) gives an E-dimensional embedding through a 1x1 convolution
of its pooled map, and a class activation map per embedding dimension ("node"). The similarity of two images
is a graph of per-node distances:

    D_l(i, j, n) = |e_l,i,n - e_l,j,n|^p                       (e L_p-normalised; p = 2)
    D^_0 = D_0
    D^_l = P_l * D_l + (1 - P_l) * (D^_{l-1} @ W_l)             for l >= 1
    d(i, j) = sum_n D^_{L-1}(i, j, n)                          (a distance: smaller is more similar)

``W_l`` keeps, for each high-level node, its ``topk`` most correlated lower-level nodes (correlations of
their activation maps, a moving average over training batches) and normalises them to sum to 1.
``P_l = sigmoid(gamma * (c_i * c_j * scale + bias))`` trusts a high-level node when its activation map is
peaky (certain) in both images; otherwise the node's distance is explained by the lower level.

The distance is pairwise, not an inner product of embeddings: :class:`AVSLScorer` evaluates it block by block
for :func:`objretrieval.search.pairwise_knn` and :meth:`objretrieval.metrics.RetrievalEvaluator.from_scorer`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objretrieval.display import ConfigRepr
from objretrieval.distributed.world import Group, all_gather_uneven, all_reduce_mean_
from objretrieval.models.checkpoint import unwrap_state_dict
from objretrieval.models.registry import CheckpointFormat, PretrainedCfg, register_model
from objretrieval.models.resnet import (
    IMAGENET_INPUT,
    ResNetTrunk,
    resnet_trunk_from_torchvision_keys,
    trunk_from_overrides,
)

if TYPE_CHECKING:
    from objretrieval.kernels.dispatch import KernelBackend

#: ResNet stages AVSL reads, low to high.
AVSL_STAGES = ("layer2", "layer3", "layer4")


class AVSLFeatures(NamedTuple):
    """What AVSL stores per image: one embedding and one certainty vector per level.

    Attributes:
        embeddings: L tensors (B, E), low level first, not normalised.
        certainties: L tensors (B, E): how peaky each node's activation map is (no gradient).
        links: in training, the L-1 batch estimates (E, E) of the correlation between the nodes of
            consecutive levels (low node m -> high node n); None in eval mode.
    """

    embeddings: tuple[Tensor, ...]
    certainties: tuple[Tensor, ...]
    links: tuple[Tensor, ...] | None = None

    def __len__(self) -> int:
        """Number of images (not of fields)."""
        return int(self.embeddings[0].shape[0])

    def rows(self, index: slice | Tensor) -> AVSLFeatures:
        """The features of a subset of images (links are dropped)."""
        return AVSLFeatures(
            tuple(e[index] for e in self.embeddings), tuple(c[index] for c in self.certainties), None
        )

    def to(self, *args: Any, **kwargs: Any) -> AVSLFeatures:
        """Move/cast every tensor (``Tensor.to`` arguments)."""
        links = None if self.links is None else tuple(x.to(*args, **kwargs) for x in self.links)
        return AVSLFeatures(
            tuple(e.to(*args, **kwargs) for e in self.embeddings),
            tuple(c.to(*args, **kwargs) for c in self.certainties),
            links,
        )

    @staticmethod
    def cat(parts: Sequence[AVSLFeatures]) -> AVSLFeatures:
        """Concatenate the features of several batches along the image axis (links are dropped)."""
        if not parts:
            raise ValueError("parts is empty: expected at least one AVSLFeatures")
        levels = len(parts[0].embeddings)
        return AVSLFeatures(
            tuple(torch.cat([p.embeddings[lv] for p in parts]) for lv in range(levels)),
            tuple(torch.cat([p.certainties[lv] for p in parts]) for lv in range(levels)),
            None,
        )

    def all_gather(self, group: Group = None) -> AVSLFeatures:
        """Every rank's features concatenated in rank order, without gradient (links are dropped); a collective.

        For a sharded evaluation each rank computes the features of its share of the images
        (:func:`~objretrieval.distributed.world.shard_range`), gathers them, and scores its share of the
        blocks (``RetrievalEvaluator.from_scorer(..., group=)``).
        """

        def gather(tensors: tuple[Tensor, ...], name: str) -> tuple[Tensor, ...]:
            return tuple(all_gather_uneven(t, group, f"{name}[{lv}]")[0] for lv, t in enumerate(tensors))

        return AVSLFeatures(gather(self.embeddings, "embeddings"), gather(self.certainties, "certainties"))


def _check_features(features: AVSLFeatures, name: str, levels: int, dim: int) -> None:
    if len(features.embeddings) != levels or len(features.certainties) != levels:
        raise ValueError(
            f"{name} must have {levels} levels of embeddings and certainties, got "
            f"{len(features.embeddings)} and {len(features.certainties)}"
        )
    n = features.embeddings[0].shape[0]
    for lv, (e, c) in enumerate(zip(features.embeddings, features.certainties, strict=True)):
        if e.shape != (n, dim) or c.shape != (n, dim):
            raise ValueError(
                f"{name} level {lv}: embeddings and certainties must be ({n}, {dim}), got "
                f"{tuple(e.shape)} and {tuple(c.shape)}"
            )
        if not e.is_floating_point():
            raise TypeError(f"{name} level {lv}: embeddings must be floating point, got {e.dtype}")


def max_location_map(x: Tensor) -> Tensor:
    """Per channel, ``max(x) * H * W`` at the arg-max position and 0 elsewhere: (B, C, H, W) -> same shape.

    Added to ``x`` before the 1x1 convolution, it makes the spatial mean of the activation map equal the
    embedding computed from average plus max pooling.
    """
    h, w = x.shape[-2:]
    pooled, where = F.adaptive_max_pool2d(x, 1, return_indices=True)
    return F.max_unpool2d(pooled, where, kernel_size=(h, w)) * (h * w)


def certainty(activation_maps: Tensor, *, official: bool = False) -> Tensor:
    """How peaky each node's activation map is: (B, E, H, W) -> (B, E).

    The map is shifted to be non-negative, L1-normalised over positions and its (unbiased) standard deviation
    taken. The paper shifts by the map's minimum; the official code subtracts the minimum of each row (along W
    only), which ``official=True`` reproduces (checkpoints trained by it learnt their reliability parameters
    on that version).
    """
    if official:
        shifted = activation_maps - activation_maps.amin(dim=-1, keepdim=True)
    else:
        shifted = activation_maps - activation_maps.amin(dim=(-2, -1), keepdim=True)
    return F.normalize(shifted.flatten(2), p=1, dim=-1).std(dim=-1)


def link_estimate(low_maps: Tensor, high_maps: Tensor) -> Tensor:
    """Batch-mean correlation of two levels' activation maps: (B, E, h, w), (B, E, H, W) -> (E, E).

    The lower map is average-pooled to the higher one's size; each node's map is L2-normalised over
    positions; entry (m, n) is the mean over images of <low node m, high node n>.
    """
    if low_maps.shape[-2:] != high_maps.shape[-2:]:
        low_maps = F.adaptive_avg_pool2d(low_maps, (high_maps.shape[-2], high_maps.shape[-1]))
    low = F.normalize(low_maps.flatten(2), dim=-1)
    high = F.normalize(high_maps.flatten(2), dim=-1)
    return torch.einsum("bmp,bnp->mn", low, high) / low.shape[0]


def topk_mask(x: Tensor, k: int, dim: int = 0, eps: float = 1e-8) -> Tensor:
    """Bool mask of the ``k`` largest entries along ``dim``, keeping every entry within ``eps`` of the k-th."""
    kth = x.topk(k, dim=dim).values.amin(dim=dim, keepdim=True)
    return x >= kth - eps


class AVSLEmbedder(ConfigRepr, nn.Module):
    """Per-level 1x1 convolutions: embeddings, activation maps, certainties and link estimates.

    Args:
        in_channels: channels of each level's feature map, low level first.
        embed_dim: E, the number of nodes per level.
        official_certainty: compute certainties as the official code does (see :func:`certainty`).
    """

    def __init__(self, in_channels: Sequence[int], embed_dim: int = 512, official_certainty: bool = False):
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f"in_channels must list at least two levels, got {list(in_channels)}")
        self.in_channels, self.embed_dim = tuple(int(c) for c in in_channels), int(embed_dim)
        self.official_certainty = official_certainty
        convs = [nn.Conv2d(c, embed_dim, kernel_size=1) for c in self.in_channels]
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out")
            nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
        self.projections = nn.ModuleList(convs)

    @property
    def num_levels(self) -> int:
        return len(self.in_channels)

    def _check(self, maps: Sequence[Tensor]) -> None:
        if len(maps) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature maps (one per level), got {len(maps)}")
        for lv, (x, c) in enumerate(zip(maps, self.in_channels, strict=True)):
            if x.dim() != 4 or x.shape[1] != c:
                raise ValueError(f"feature map {lv} must be (B, {c}, H, W), got shape {tuple(x.shape)}")
            if x.shape[-2] * x.shape[-1] < 2:
                raise ValueError(
                    f"feature map {lv} is {tuple(x.shape[-2:])}: certainties need at least 2 positions "
                    "(use larger images)"
                )

    def embeddings(self, maps: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """(B, E) per level: the 1x1 convolution of global average plus global max pooling."""
        self._check(maps)
        return tuple(
            conv(F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)).flatten(1)
            for conv, x in zip(self.projections, maps, strict=True)
        )

    @torch.no_grad()
    def activation_maps(self, maps: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """(B, E, H_l, W_l) per level: where in the image each node fires (no gradient)."""
        self._check(maps)
        return tuple(conv(x + max_location_map(x)) for conv, x in zip(self.projections, maps, strict=True))

    def forward(self, maps: Sequence[Tensor]) -> AVSLFeatures:
        """Features of a batch: (B, C_l, H_l, W_l) maps -> :class:`AVSLFeatures` (links in training mode)."""
        embeddings = self.embeddings(maps)
        cams = self.activation_maps(maps)
        with torch.no_grad():
            certainties = tuple(certainty(a, official=self.official_certainty) for a in cams)
            links = (
                tuple(link_estimate(lo, hi) for lo, hi in itertools.pairwise(cams)) if self.training else None
            )
        return AVSLFeatures(embeddings, certainties, links)


class LevelDistances(NamedTuple):
    """Distance matrices of a set of rows against a set of columns.

    Attributes:
        final: (R, C) propagated distance (what AVSL ranks by).
        levels: L matrices (R, C), each level's own squared distance of normalised embeddings, or an empty
            tuple when not requested.
    """

    final: Tensor
    levels: tuple[Tensor, ...]


class NodeDistances(NamedTuple):
    """Per-node quantities of each (row, column) pair: every tensor is (R, C, E), one per level.

    Attributes:
        raw: D_l, each level's own per-node distances.
        reliability: P_l for levels >= 1 (L - 1 tensors): the weight of the node's own distance.
        propagated: D^_l, the corrected distances (D^_0 = D_0); the final distance sums D^_{L-1} over nodes.
    """

    raw: tuple[Tensor, ...]
    reliability: tuple[Tensor, ...]
    propagated: tuple[Tensor, ...]


class AttributableSimilarity(ConfigRepr, nn.Module):
    """AVSL's similarity graph: link statistics between levels and the learnt node reliabilities.

    Args:
        embed_dim: E, nodes per level.
        num_levels: L.
        topk: lower-level nodes kept per higher node in the propagation.
        gamma: sharpness of the reliability sigmoid.
        momentum: m of the link moving average ``link <- m * link + (1 - m) * batch estimate``.
        p: the per-node distance is ``|x - y|^p`` of L_p-normalised embeddings.

    Buffers ``links`` (L-1, E, E) and ``num_link_updates`` are saved with the model. Under
    ``torch.distributed`` the batch estimates are averaged over ranks before the update, so every rank holds
    the same links (the official code kept them per process).
    """

    def __init__(
        self,
        embed_dim: int = 512,
        num_levels: int = 3,
        topk: int = 128,
        gamma: float = 10.0,
        momentum: float = 0.5,
        p: float = 2.0,
    ) -> None:
        super().__init__()
        if num_levels < 2 or topk < 1 or not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"need num_levels >= 2, topk >= 1 and momentum in [0, 1); got {num_levels}, {topk}, {momentum}"
            )
        self.embed_dim, self.num_levels = int(embed_dim), int(num_levels)
        self.topk, self.gamma, self.momentum, self.p = int(topk), float(gamma), float(momentum), float(p)
        # level 0 has no reliability: its distances are taken as they are
        self.reliability_scale = nn.Parameter(torch.ones(num_levels - 1, embed_dim))
        self.reliability_bias = nn.Parameter(torch.zeros(num_levels - 1, embed_dim))
        self.register_buffer("links", torch.zeros(num_levels - 1, embed_dim, embed_dim))
        self.register_buffer("num_link_updates", torch.zeros((), dtype=torch.int64))
        self.links: Tensor
        self.num_link_updates: Tensor

    @torch.no_grad()
    def update_links(self, batch_links: Sequence[Tensor]) -> None:
        """Fold one batch's link estimates into the moving averages (the first batch is copied)."""
        if len(batch_links) != self.num_levels - 1:
            raise ValueError(f"expected {self.num_levels - 1} link estimates, got {len(batch_links)}")
        new = torch.stack([x.to(self.links) for x in batch_links])
        if new.shape != self.links.shape:
            raise ValueError(
                f"link estimates must be {tuple(self.links.shape[1:])}, got {tuple(new.shape[1:])}"
            )
        all_reduce_mean_(new)
        if int(self.num_link_updates) == 0:
            self.links.copy_(new)
        else:
            self.links.mul_(self.momentum).add_(new, alpha=1.0 - self.momentum)
        self.num_link_updates += 1

    def propagation_weights(self) -> Tensor:
        """(L-1, E, E) W_l: for each high node (column), its top-k positive links, normalised to sum 1.

        Ties at the k-th value are all kept (the official ``topk_mask``).
        """
        link = torch.relu(self.links)
        kept = link * topk_mask(link, min(self.topk, self.embed_dim), dim=1)
        return kept / (kept.sum(dim=1, keepdim=True) + 1e-8)

    def _reliability_terms(self, level: int, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """gamma * scale * c_rows (R, E), c_cols (C, E) and gamma * bias (E,) of a level >= 1."""
        scaled = rows * (self.gamma * self.reliability_scale[level - 1])
        return scaled, cols, self.gamma * self.reliability_bias[level - 1]

    def _node_terms(
        self,
        rows: AVSLFeatures,
        cols: AVSLFeatures,
        weights: Tensor,
        keep_nodes: bool,
        paired: bool = False,
    ) -> tuple[Tensor, list[Tensor], NodeDistances | None]:
        """The propagation over levels; returns (D^_{L-1}, per-level distances, per-node tensors if kept).

        Tensors are (R, C, E), or (R, 1, E) for ``paired`` rows and columns (row i against column i only).
        Without autograd they are updated in place.
        """

        def columns(t: Tensor) -> Tensor:
            return t[:, None, :] if paired else t[None, :, :]

        inplace = not torch.is_grad_enabled() and not keep_nodes
        raw: list[Tensor] = []
        reliability: list[Tensor] = []
        propagated: list[Tensor] = []
        levels: list[Tensor] = []
        hat: Tensor | None = None
        for lv in range(self.num_levels):
            x = F.normalize(rows.embeddings[lv].float(), p=self.p, dim=-1)
            y = F.normalize(cols.embeddings[lv].float(), p=self.p, dim=-1)
            diff = x[:, None, :] - columns(y)
            diff = diff.square_() if self.p == 2.0 and inplace else diff.abs().pow(self.p)
            if torch.is_grad_enabled():
                levels.append(diff.sum(-1))
            if keep_nodes:
                raw.append(diff.detach())
            diff = diff.detach()  # only the reliabilities learn from the propagated distance
            if hat is None:
                hat = diff
            else:
                trans = (hat.flatten(0, 1) @ weights[lv - 1]).view_as(hat)
                scaled, other, bias = self._reliability_terms(
                    lv, rows.certainties[lv].float(), cols.certainties[lv].float()
                )
                logits = scaled[:, None, :] * columns(other)
                if inplace:
                    prob = logits.add_(bias).sigmoid_()
                    hat = diff.sub_(trans).mul_(prob).add_(trans)  # P * D + (1 - P) * T
                else:
                    prob = torch.sigmoid(logits + bias)
                    hat = diff * prob + trans * (1 - prob)
                if keep_nodes:
                    reliability.append(prob.detach())
            if keep_nodes:
                propagated.append(hat.detach())
        assert hat is not None
        nodes = NodeDistances(tuple(raw), tuple(reliability), tuple(propagated)) if keep_nodes else None
        return hat, levels, nodes

    def forward(
        self, rows: AVSLFeatures, cols: AVSLFeatures, *, backend: KernelBackend = "torch"
    ) -> LevelDistances:
        """Distance matrices of every row image against every column image.

        With autograd enabled, the per-level matrices are returned too (they carry the gradient into the
        embeddings; the final matrix only trains the reliabilities). Memory is R x C x E per tensor: score
        large sets through :class:`AVSLScorer`, which works in blocks.

        Args:
            rows: features of R images (or proxies).
            cols: features of C images (or proxies).
            backend: ``"torch"`` (this path), ``"triton"`` (the fused kernel of :mod:`objretrieval.kernels.avsl`:
                (R, C) memory, inference only, so it raises when gradients are needed) or ``"auto"`` (the kernel
                only on a CUDA device where the GPU benchmark measured it faster, and only without gradients).
        """
        _check_features(rows, "rows", self.num_levels, self.embed_dim)
        _check_features(cols, "cols", self.num_levels, self.embed_dim)
        from objretrieval.kernels.avsl import fused_distances, use_kernel

        if use_kernel(backend, self, rows, cols):  # checked above and there: the kernel itself
            return LevelDistances(fused_distances(self, rows, cols), ())
        hat, levels, _ = self._node_terms(rows, cols, self.propagation_weights(), keep_nodes=False)
        return LevelDistances(hat.sum(-1), tuple(levels))

    def node_distances(self, rows: AVSLFeatures, cols: AVSLFeatures) -> NodeDistances:
        """Per-node raw, reliability and propagated distances of every pair (R, C, E): explanations."""
        _check_features(rows, "rows", self.num_levels, self.embed_dim)
        _check_features(cols, "cols", self.num_levels, self.embed_dim)
        with torch.no_grad():
            _, _, nodes = self._node_terms(rows, cols, self.propagation_weights(), keep_nodes=True)
        assert nodes is not None
        return nodes


class AVSL(ConfigRepr, nn.Module):
    """AVSL: a ResNet trunk, per-level embeddings and the attributable similarity graph.

    Args:
        trunk: the backbone giving the ``AVSL_STAGES`` maps, or None to feed stage maps directly
            (:meth:`forward_features`).
        in_channels: channels of the three stage maps (taken from ``trunk`` when given).
        embed_dim: E.
        topk: see :class:`AttributableSimilarity`.
        gamma: see :class:`AttributableSimilarity`.
        momentum: see :class:`AttributableSimilarity`.
        p: see :class:`AttributableSimilarity`.
        official_certainty: see :func:`certainty`; set it for checkpoints trained with the official code.

    In training mode, every forward pass updates the link moving averages, as BatchNorm updates its
    statistics.
    """

    # the arguments live in the two parts that use them; the repr reads them back from there
    config_attributes: ClassVar[dict[str, str | None]] = {
        "in_channels": "embedder.in_channels",
        "official_certainty": "embedder.official_certainty",
        **{name: f"similarity.{name}" for name in ("topk", "gamma", "momentum", "p")},
    }

    def __init__(
        self,
        trunk: ResNetTrunk | None = None,
        in_channels: Sequence[int] | None = None,
        embed_dim: int = 512,
        topk: int = 128,
        gamma: float = 10.0,
        momentum: float = 0.5,
        p: float = 2.0,
        official_certainty: bool = False,
    ) -> None:
        super().__init__()
        if trunk is not None:
            in_channels = trunk.stage_channels[1:]
        if in_channels is None:
            raise ValueError("pass a trunk or the in_channels of the stage maps")
        self.trunk = trunk
        self.embedder = AVSLEmbedder(in_channels, embed_dim, official_certainty)
        self.similarity = AttributableSimilarity(embed_dim, len(in_channels), topk, gamma, momentum, p)

    @property
    def embed_dim(self) -> int:
        return self.embedder.embed_dim

    def stage_maps(self, images: Tensor) -> list[Tensor]:
        """The trunk's (B, C_l, H_l, W_l) maps of ``layer2``-``layer4``."""
        if self.trunk is None:
            raise ValueError("this AVSL has no trunk: call forward_features with stage maps")
        return self.trunk(images, AVSL_STAGES)

    def forward(self, images: Tensor) -> AVSLFeatures:
        """(B, 3, H, W) images -> :class:`AVSLFeatures`; in training mode the links are updated."""
        return self.forward_features(self.stage_maps(images))

    def forward_features(self, maps: Sequence[Tensor]) -> AVSLFeatures:
        """Like :meth:`forward` from the stage maps."""
        features = self.embedder(maps)
        if self.training:
            assert features.links is not None
            self.similarity.update_links(features.links)
        return features

    def distance(self, rows: AVSLFeatures, cols: AVSLFeatures, *, backend: KernelBackend = "torch") -> Tensor:
        """(R, C) AVSL distances (smaller is more similar), computed in memory-bounded blocks (``backend``: see
        :class:`AVSLScorer`)."""
        return -AVSLScorer(self, rows, cols, symmetric=False, backend=backend).full_scores()

    @torch.no_grad()
    def explain(self, images_a: Tensor, images_b: Tensor) -> AVSLExplanation:
        """Everything behind the distance of image pairs ``(images_a[i], images_b[i])``, in eval mode.

        Args:
            images_a: (B, 3, H, W) first images of the pairs.
            images_b: (B, 3, H, W) second images.
        """
        if images_a.shape != images_b.shape:
            raise ValueError(
                f"images_a and images_b must have the same shape, got {tuple(images_a.shape)} and "
                f"{tuple(images_b.shape)}"
            )
        was_training = self.training
        self.eval()
        try:
            maps_a, maps_b = self.stage_maps(images_a), self.stage_maps(images_b)
            fa, fb = self.embedder(maps_a), self.embedder(maps_b)
            cams_a, cams_b = self.embedder.activation_maps(maps_a), self.embedder.activation_maps(maps_b)
            b = images_a.shape[0]
            pairs = torch.arange(b)
            nodes = self.similarity.node_distances(fa, fb)
            pick = [tuple(t[pairs, pairs] for t in group) for group in nodes]
            return AVSLExplanation(
                distance=pick[2][-1].sum(-1),
                raw=pick[0],
                reliability=pick[1],
                propagated=pick[2],
                certainties_a=fa.certainties,
                certainties_b=fb.certainties,
                activation_maps_a=cams_a,
                activation_maps_b=cams_b,
                propagation_weights=self.similarity.propagation_weights(),
            )
        finally:
            self.train(was_training)


@dataclass(frozen=True)
class AVSLExplanation:
    """Why AVSL finds pairs of images similar; B pairs, L levels, E nodes per level.

    Attributes:
        distance: (B,) final distances.
        raw: L tensors (B, E): each level's per-node distances.
        reliability: L-1 tensors (B, E): how much each higher node trusted its own distance.
        propagated: L tensors (B, E): corrected per-node distances; ``propagated[-1].sum(-1) == distance``.
        certainties_a, certainties_b: L tensors (B, E).
        activation_maps_a, activation_maps_b: L tensors (B, E, H_l, W_l): where each node fires.
        propagation_weights: (L-1, E, E) W_l, low node m -> high node n, columns summing to 1.
    """

    distance: Tensor
    raw: tuple[Tensor, ...]
    reliability: tuple[Tensor, ...]
    propagated: tuple[Tensor, ...]
    certainties_a: tuple[Tensor, ...]
    certainties_b: tuple[Tensor, ...]
    activation_maps_a: tuple[Tensor, ...]
    activation_maps_b: tuple[Tensor, ...]
    propagation_weights: Tensor

    def top_nodes(self, pair: int = 0, k: int = 5) -> Tensor:
        """The k top-level nodes that make pair ``pair`` most similar.

        Among the nodes whose corrected distance is at most the pair's median (the attributes the two images
        agree on), those the model trusted most (highest reliability: peaky activation maps in both images).
        """
        distance, trust = self.propagated[-1][pair], self.reliability[-1][pair]
        agreeing = distance <= distance.median()
        score = torch.where(agreeing, trust, trust.new_tensor(-1.0))
        return score.topk(min(k, int(agreeing.sum()))).indices

    def supporting_nodes(self, node: int, level: int | None = None, k: int = 3) -> Tensor:
        """The k lower-level nodes a node of ``level`` (default: the top level) relies on most."""
        level = len(self.propagated) - 1 if level is None else level
        if not 1 <= level < len(self.propagated):
            raise ValueError(f"level must lie in [1, {len(self.propagated) - 1}], got {level}")
        weights = self.propagation_weights[level - 1][:, node]
        return weights.topk(min(k, weights.shape[0])).indices


class AVSLScorer:
    """Pairwise AVSL scores of query images against gallery images, block by block.

    Implements the :class:`objretrieval.search.PairwiseScorer` protocol and its dense-block extension
    (:class:`~objretrieval.search.pairwise.BlockScorer`): scores are negative AVSL distances
    (higher is better). Each block holds (query block x gallery block x E) floats per tensor, never the whole
    Q x N matrix.

    Args:
        model: an :class:`AVSL` (or its :class:`AttributableSimilarity`); evaluated as is, without gradient.
        queries: features of the queries (from the model in eval mode).
        gallery: features of the gallery, or None to score the queries against themselves.
        symmetric: the gallery is the query set (default when ``gallery`` is None): blocks below the diagonal
            are mirrored instead of recomputed.
        device: where to compute (default: the queries' device).
        backend: ``"torch"`` (blocks through :meth:`AttributableSimilarity.forward`'s path), ``"triton"`` (the
            fused kernel of :mod:`objretrieval.kernels.avsl`: a block holds only its (q, g) scores) or
            ``"auto"`` (the kernel only on a CUDA device where the GPU benchmark measured it faster).
    """

    def __init__(
        self,
        model: AVSL | AttributableSimilarity,
        queries: AVSLFeatures,
        gallery: AVSLFeatures | None = None,
        *,
        symmetric: bool | None = None,
        device: torch.device | str | None = None,
        backend: KernelBackend = "torch",
    ) -> None:
        from objretrieval.kernels.dispatch import resolve_backend

        self.similarity = model.similarity if isinstance(model, AVSL) else model
        levels, dim = self.similarity.num_levels, self.similarity.embed_dim
        _check_features(queries, "queries", levels, dim)
        if gallery is not None:
            _check_features(gallery, "gallery", levels, dim)
        self.device = torch.device(device) if device is not None else queries.embeddings[0].device
        self.queries = self._prepare(queries)
        self.gallery = self.queries if gallery is None else self._prepare(gallery)
        self.symmetric = gallery is None if symmetric is None else symmetric
        with torch.no_grad():
            self.weights = self.similarity.propagation_weights().to(self.device)
        self.backend = resolve_backend("avsl_distance", backend, self.device)

    def _prepare(self, features: AVSLFeatures) -> AVSLFeatures:
        return AVSLFeatures(
            tuple(e.detach().to(self.device, torch.float32) for e in features.embeddings),
            tuple(c.detach().to(self.device, torch.float32) for c in features.certainties),
        )

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    @property
    def num_gallery(self) -> int:
        return len(self.gallery)

    @torch.no_grad()
    def score_block(self, query_rows: slice, gallery_rows: slice) -> Tensor:
        """(q, g) negative AVSL distances of a block of queries against a block of gallery items."""
        if self.backend == "triton":
            return self._kernel(self.queries.rows(query_rows), self.gallery.rows(gallery_rows), paired=False)
        hat, _, _ = self.similarity._node_terms(
            self.queries.rows(query_rows), self.gallery.rows(gallery_rows), self.weights, keep_nodes=False
        )
        return hat.sum(-1).neg_()

    @torch.no_grad()
    def score_pairs(self, query_ids: Tensor, gallery_ids: Tensor) -> Tensor:
        """(P,) negative AVSL distances of the pairs ``(query_ids[i], gallery_ids[i])``."""
        from objretrieval.search.pairwise import check_pairs

        query_ids, gallery_ids = check_pairs(self, query_ids, gallery_ids)
        q, g = self.queries.rows(query_ids), self.gallery.rows(gallery_ids)
        if self.backend == "triton":
            return self._kernel(q, g, paired=True)
        hat, _, _ = self.similarity._node_terms(q, g, self.weights, keep_nodes=False, paired=True)
        return hat.sum(-1).squeeze(1).neg_()

    def _kernel(self, q: AVSLFeatures, g: AVSLFeatures, paired: bool) -> Tensor:
        from objretrieval.kernels.avsl import fused_distances

        # features checked once at construction, the backend resolved there: only the kernel, per block
        return fused_distances(self.similarity, q, g, self.weights, paired=paired).neg_()

    def shortlist(self, k: int, level: int = -1, exclude_self: bool | None = None) -> Tensor:
        """(Q, k) gallery ids nearest to each query by one level's embedding alone (cosine), for rescoring.

        Our addition, not in the paper: ranking a large gallery by AVSL costs (Q x N) propagations; ranking it
        by the top-level embedding is a plain kNN, and rescoring the top ``k`` with AVSL
        (``pairwise_knn(scorer, k_final, candidates=scorer.shortlist(k))``) recovers most of AVSL's ranking
        when ``k`` comfortably exceeds the depth the metrics read. Leave-one-out (the default for a scorer
        built without a gallery) leaves each query out of its own shortlist. A scorer on the Triton kernels
        searches with the fused kNN kernel too (``knn(backend="triton")``: the same shortlist).
        """
        from objretrieval.search import knn

        exclude_self = self.symmetric if exclude_self is None else exclude_self
        queries = self.queries.embeddings[level]
        gallery = None if exclude_self else self.gallery.embeddings[level]
        return knn(queries, gallery, k=k, metric="cosine", backend=self.backend).indices

    def full_scores(self, block_size: int = 256) -> Tensor:
        """(Q, N) every score, for small sets (the distance matrix itself)."""
        out = torch.empty(self.num_queries, self.num_gallery, device=self.device)
        for i in range(0, self.num_queries, block_size):
            for j in range(0, self.num_gallery, block_size):
                out[i : i + block_size, j : j + block_size] = self.score_block(
                    slice(i, i + block_size), slice(j, j + block_size)
                )
        return out


# ---------------------------------------------------------------------------------------------- checkpoints
_SECTIONS = ("trunk", "embedder", "collector")


def _official_sections(obj: Any) -> dict[str, dict[str, Tensor]]:
    """The official run's three state dicts, found by section name in a mapping of them."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a mapping of the official state dicts, got {type(obj).__name__}")
    found: dict[str, dict[str, Tensor]] = {}
    for key, value in obj.items():
        section = next((s for s in _SECTIONS if s in str(key)), None)
        if section is not None and isinstance(value, Mapping):
            found[section] = unwrap_state_dict(value)
    if "embedder" not in found or "collector" not in found:
        raise KeyError(
            "an official AVSL checkpoint is a mapping with 'trunk', 'embedder' and 'collector' state dicts "
            f"(models_trunk_best.ckpt, models_embedder_best.ckpt, collectors_collector_best.ckpt); got {list(obj)}"
        )
    return found


def convert_official_avsl(obj: Any) -> dict[str, Tensor]:
    """Official zbr17/AVSL weights -> :class:`AVSL` keys.

    ``obj`` maps section names to the three files' state dicts: ``{"trunk": ..., "embedder": ...,
    "collector": ...}`` (keys containing those words, e.g. ``models_trunk``, also work; the trunk may be left
    out for a trunk-less model); :func:`read_official_avsl` reads them from a run directory.

    Mapping: ``model.*`` -> ``trunk.*`` (ImageNet ``fc`` dropped); ``conv1x1_l.*`` ->
    ``embedder.projections.l.*``; ``prob_coef_l``/``prob_bias_l`` (l >= 1) -> rows of
    ``similarity.reliability_scale``/``reliability_bias``; ``link_{l}to{l+1}`` -> ``similarity.links[l]``.
    Dropped: the level-0 reliability parameters (never used by the official code) and the Proxy-Anchor
    proxies, which belong to the loss (:meth:`objretrieval.losses.AVSLProxyAnchorLoss.load_official_proxies`).
    """
    sections = _official_sections(obj)
    out: dict[str, Tensor] = {}
    if "trunk" in sections:
        out.update(
            {
                f"trunk.{k}": v
                for k, v in resnet_trunk_from_torchvision_keys(sections["trunk"], "model.").items()
            }
        )
    embedder = sections["embedder"]
    levels = sorted(int(k[len("conv1x1_") :].split(".")[0]) for k in embedder if k.endswith(".weight"))
    if levels != list(range(len(levels))):
        raise KeyError(f"embedder keys conv1x1_0.. expected, got {sorted(embedder)}")
    for lv in levels:
        for kind in ("weight", "bias"):
            out[f"embedder.projections.{lv}.{kind}"] = embedder[f"conv1x1_{lv}.{kind}"]
    collector = sections["collector"]
    out["similarity.reliability_scale"] = torch.stack([collector[f"prob_coef_{lv}"] for lv in levels[1:]])
    out["similarity.reliability_bias"] = torch.stack([collector[f"prob_bias_{lv}"] for lv in levels[1:]])
    links = torch.stack([collector[f"link_{lv}to{lv + 1}"] for lv in levels[:-1]])
    out["similarity.links"] = links
    # the official code kept "links initialised" as a Python flag; trained links are never all zero
    out["similarity.num_link_updates"] = torch.tensor(int(bool(links.any())), dtype=torch.int64)
    return out


def read_official_avsl(directory: str | Any, suffix: str = "_best.ckpt") -> dict[str, dict[str, Tensor]]:
    """Read an official AVSL run's ``models_trunk``, ``models_embedder`` and ``collectors_collector`` files.

    Returns the mapping :func:`convert_official_avsl` takes (also accepted by
    ``objretrieval.create_model(..., checkpoint=...)``).
    """
    from pathlib import Path

    from objretrieval.models.checkpoint import read_checkpoint

    root = Path(directory)
    files = {"trunk": "models_trunk", "embedder": "models_embedder", "collector": "collectors_collector"}
    out = {}
    for section, stem in files.items():
        path = root / f"{stem}{suffix}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (an official AVSL run saves {stem}{suffix})")
        out[section] = unwrap_state_dict(read_checkpoint(path))
    return out


AVSL_OFFICIAL = CheckpointFormat(
    "avsl_official",
    convert_official_avsl,
    description="zbr17/AVSL run: {'trunk', 'embedder', 'collector'} state dicts (see read_official_avsl)",
)

_PAPER = "Zhang et al., Attributable Visual Similarity Learning, CVPR 2022"


def _avsl(arch: str, overrides: dict[str, Any]) -> AVSL:
    return AVSL(trunk_from_overrides(arch, overrides, freeze_bn_affine=True), **overrides)


@register_model(
    pretrained=PretrainedCfg(
        **IMAGENET_INPUT,
        descriptor="3 levels (ResNet50 layer2/3/4) x 512 nodes",
        paper=_PAPER,
        notes="The authors released no weights; load a run of the official code with read_official_avsl "
        "and official_certainty=True.",
    ),
    formats=[AVSL_OFFICIAL],
)
def avsl_resnet50(**overrides: Any) -> AVSL:
    """AVSL on ResNet50 (frozen BatchNorm), 512 nodes per level, top-128 links, gamma 10, link momentum 0.5.

    ``weights="IMAGENET1K_V1"`` starts the trunk from torchvision's ImageNet weights (the paper's start);
    ``freeze_bn=False`` trains BatchNorm as the official SOP run does.
    """
    return _avsl("resnet50", overrides)


@register_model(formats=[AVSL_OFFICIAL])
def avsl_resnet10(**overrides: Any) -> AVSL:
    """A tiny AVSL (BasicBlock ResNet with one block per stage, 128 nodes, top-32 links) for tests and demos."""
    return _avsl("resnet10", {"embed_dim": 128, "topk": 32, **overrides})
