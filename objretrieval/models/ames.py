"""AMES: asymmetric and memory-efficient similarity of two images from their local descriptors.

Suma, Kordopatis-Zilos, Iscen and Tolias, ECCV 2024. A small transformer reads the local descriptors of a
query (many, e.g. 600) and of a database image (few, e.g. 50) and outputs one logit; reranking a global kNN
shortlist with it is the method. The database side can be binarized (128 bits per descriptor).

The sequence is ``[m, query_1..query_Q, database_1..database_T]`` with a learned matching token m. In every
layer a self-attention lets each image attend within itself (and m to everything) and a cross-attention
lets each image attend to the other (and m to everything). Those block patterns are computed here as three
fused attention calls per attention (m, query rows, database rows) instead of one masked L x L product, and
when only the score is wanted the last layer computes the cross-attention and feed-forward of m alone. Module
and parameter names are the official ones, so official checkpoints (weights under ``"state"``) load as they
are.

``attention="flex"`` runs each attention as one FlexAttention call instead (``torch.nn.attention.flex_attention``,
compiled to a Triton kernel on CUDA), with a block mask that skips the 128 x 128 tiles holding no real token
pair: padding, and the pairs the self/cross pattern never scores. That path orders the sequence
``[m, database, query]`` inside (m and the 50 database tokens share the first tile, so the query rows' cross
attention reads one key tile) and returns the token states in the official order.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objretrieval._validation import check_choice, check_finite_values, check_not_all_padded
from objretrieval.display import ConfigRepr, SummaryRepr
from objretrieval.kernels.dispatch import measured_faster
from objretrieval.models.binary import pack_bits, signs_from_bits
from objretrieval.models.registry import CheckpointFormat, PretrainedCfg, register_model

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

Activation = Literal["relu", "gelu"]
#: How attention runs: three fused SDPA calls with keep masks, one block-sparse FlexAttention call, or FlexAttention
#: where the GPU benchmark measured it faster (``MEASURED["ames_attention"]``), dense elsewhere.
AttentionBackend = Literal["dense", "flex", "auto"]

_FF_CHUNK = 4096  # tokens per feed-forward chunk in inference
_FLEX_BLOCK = 128  # FlexAttention's default tile: the granularity of its block masks

#: (lamb, temp) of the score fusion ``lamb * global + (1 - lamb) * sigmoid(temp * logit)``, tuned on GLDv2-test
#: public by the AMES authors for each released model; (0.5, 0.5) is the official configuration's default.
AMES_FUSION: dict[str, tuple[float, float]] = {
    "dinov2_ames": (0.55, 0.30),
    "dinov2_ames_dist": (0.35, 0.10),
    "cvnet_ames": (0.85, 0.80),
    "cvnet_ames_dist": (0.65, 0.20),
}


class BinarizationLayer(ConfigRepr, nn.Module):
    """``sign(normalize(x) @ W)`` with a trainable projection W (Dl, bits); ``erf`` relaxation in training.

    The official model initialises W from an ITQ rotation file; here W starts as a random orthonormal
    projection (:meth:`load_itq` reads the official ``.npz``), and checkpoints overwrite it anyway.

    Args:
        dims: input dimension Dl.
        bits: number of bits (must equal the model dimension).
        sigma: relaxation width: ``erf(x / sqrt(2 sigma))`` in training.
    """

    def __init__(self, dims: int, bits: int, sigma: float = 1e-6) -> None:
        super().__init__()
        self.dims, self.bits, self.sigma = dims, bits, sigma
        self.W = nn.Parameter(torch.empty(dims, bits))
        nn.init.orthogonal_(self.W)

    def load_itq(self, path: str) -> None:
        """Set W from an official ITQ file (``np.savez`` with key ``proj`` of shape (Dl, bits))."""
        import numpy as np

        proj = torch.from_numpy(np.load(path)["proj"]).float()
        if proj.shape != self.W.shape:
            raise ValueError(f"ITQ projection has shape {tuple(proj.shape)}, expected {tuple(self.W.shape)}")
        with torch.no_grad():
            self.W.copy_(proj)

    def project(self, x: Tensor) -> Tensor:
        """Real-valued projections ``normalize(x) @ W`` before binarization."""
        return F.normalize(x, dim=-1) @ self.W

    def forward(self, x: Tensor) -> Tensor:
        z = self.project(x)
        return torch.erf(z / math.sqrt(2 * self.sigma)) if self.training else torch.sign(z)


def _attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    """Fused scaled dot-product attention of (B, H, Lq, dh) queries; ``keep`` (B, Lk) marks usable keys."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


# -- FlexAttention ---------------------------------------------------------------------------------------------


def _require_flex() -> None:
    """Refuse ``attention="flex"`` clearly on a torch without FlexAttention (added in torch 2.5)."""
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError as err:
        raise ImportError(
            f"attention='flex' needs torch.nn.attention.flex_attention (torch >= 2.5), which torch "
            f"{torch.__version__} lacks; use attention='dense'"
        ) from err


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    """FlexAttention compiled once (to Triton on CUDA); eager FlexAttention materialises the scores."""
    from torch.nn.attention.flex_attention import flex_attention

    return cast(Callable[..., Tensor], torch.compile(flex_attention))


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    """One FlexAttention call: compiled on CUDA, eager elsewhere (correct, and it spares a CPU compile of
    ~15 s per shape)."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # inside a compiled model: torch.compile lowers it in place
        return flex_attention(q, k, v, block_mask=block_mask)
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=block_mask)
    if q.requires_grad:
        raise NotImplementedError(
            "attention='flex' cannot train on the CPU (FlexAttention has no CPU backward); "
            "use model.set_attention('dense') there"
        )
    with warnings.catch_warnings():  # the unfused eager path is this function's documented CPU behaviour
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask)


def _pair_rule(q_idx: Tensor, kv_idx: Tensor, split: Tensor, cross: bool) -> Tensor:
    """Which token pairs an attention scores, over ``[m, first image, second image]`` with the second image
    from ``split`` on: m with every token, and each image with itself (self) or with the other (cross)."""
    other = (q_idx < split) != (kv_idx < split)
    return (other if cross else ~other) | (q_idx == 0) | (kv_idx == 0)


def _block_mask(keep: Tensor, split: int, cross: bool) -> BlockMask:
    """The FlexAttention block mask of one attention over a batch of sequences; ``keep`` (B, L) real tokens.

    Which tiles hold scored pairs is counted at tile level, ``counts[b, i, j] = sum over the key columns c of
    tile j of (rows of tile i scoring c) * keep[b, c]``, so the (B, L, L) mask that ``create_block_mask``
    would evaluate is never formed: a tile is skipped at count 0 and runs without its mask at a full count.
    """
    from torch.nn.attention.flex_attention import BlockMask

    batch, length = keep.shape
    tiles = -(-length // _FLEX_BLOCK)
    # tail slots: never keys, and in bounds for mask_mod
    keep = F.pad(keep, (0, tiles * _FLEX_BLOCK - length))
    index = torch.arange(tiles * _FLEX_BLOCK, device=keep.device)
    # a tensor, not a constant, so one compiled kernel serves every split
    split_at = torch.tensor(split, device=keep.device)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return keep[b, kv_idx] & _pair_rule(q_idx, kv_idx, split_at, cross)

    rows = _pair_rule(index[:, None], index[None, :], split_at, cross) & (index < length)[:, None]
    scoring = rows.view(tiles, _FLEX_BLOCK, tiles, _FLEX_BLOCK).sum(1, dtype=torch.float32)  # (ti, tj, c)
    counts = torch.einsum("ijc,bjc->bij", scoring, keep.view(batch, tiles, _FLEX_BLOCK).float())
    full = counts == _FLEX_BLOCK * _FLEX_BLOCK  # integers up to 2^14: exact in float32
    partial = (counts > 0) & ~full
    return BlockMask.from_kv_blocks(
        *_tile_lists(partial),
        *_tile_lists(full),
        BLOCK_SIZE=_FLEX_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )


def _tile_lists(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """(B, Ti, Tj) bool tiles -> BlockMask's (B, 1, Ti) counts and (B, 1, Ti, Tj) key-tile indices, used first."""
    indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True)
    # contiguous: the compiled kernels read the indices by row-major offsets (argsort may return other strides)
    return tiles.sum(-1, dtype=torch.int32)[:, None], indices.to(torch.int32)[:, None].contiguous()


def _tokens_seen(x: Tensor, image: str, split: int, dim: int) -> Tensor:
    """The tokens an image's rows attend to in the dense path: m plus the ``"first"`` image's tokens (1 to
    ``split``) or m plus the ``"second"`` image's (``split`` on), along the token axis ``dim`` of ``x``."""
    if image == "first":
        return x.narrow(dim, 0, split)
    return torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, split, x.shape[dim] - split)], dim)


@dataclass(frozen=True)
class _Layout:
    """What every attention of one forward reads: ``[m, first image, second image]`` split at ``split``,
    which tokens are real, and the (self, cross) block masks when FlexAttention runs."""

    split: int
    keep: Tensor
    flex_masks: tuple[BlockMask, BlockMask] | None = None

    def keep_of(self, image: str) -> Tensor:
        """(B, 1 + n) keep mask of m and the ``"first"`` or ``"second"`` image's tokens."""
        return _tokens_seen(self.keep, image, self.split, 1)


class _Heads:
    """A sequence projected to multi-head queries, keys and values, sliced into the token groups."""

    def __init__(self, mha: nn.MultiheadAttention, x: Tensor, split: int) -> None:
        b, length, d = x.shape
        h = mha.num_heads
        qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
        qkv = qkv.view(b, length, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (3, B, H, L, dh)
        self.q, self.k, self.v = qkv[0], qkv[1], qkv[2]
        self.split = split

    def keys(self, group: str) -> tuple[Tensor, Tensor]:
        """Keys/values of m plus the ``"first"`` or ``"second"`` image's tokens, or of all tokens."""
        if group == "all":
            return self.k, self.v
        return _tokens_seen(self.k, group, self.split, 2), _tokens_seen(self.v, group, self.split, 2)


class AMESLayer(ConfigRepr, nn.Module):
    """One AMES layer: self-attention within each image, cross-attention between them, feed-forward."""

    config_attributes: ClassVar[dict[str, str | None]] = {
        "d_model": "linear1.in_features",
        "nhead": "self_attn.num_heads",
        "dim_feedforward": "linear1.out_features",
    }

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, activation: Activation, normalize_before: bool
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        activations: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}
        self.activation = activation
        self._activation = activations[activation]
        self.normalize_before = normalize_before

    def _block_attention(
        self, mha: nn.MultiheadAttention, x: Tensor, layout: _Layout, cross: bool, only_first: bool
    ) -> Tensor:
        """Attention where m sees every token and each image sees itself (self) or the other image (cross)."""
        heads = _Heads(mha, x, layout.split)
        b, h, _, dh = heads.q.shape
        k, v = heads.keys("all")
        # m's row alone: one query row has no tile to skip, so one fused dense call serves both paths
        if only_first:
            out = _attention(heads.q[:, :, :1], k, v, layout.keep)
        elif layout.flex_masks is not None:
            out = _flex_attention(heads.q, k, v, layout.flex_masks[int(cross)])
        else:
            first_rows, second_rows = heads.q[:, :, 1 : layout.split], heads.q[:, :, layout.split :]
            first_sees, second_sees = ("second", "first") if cross else ("first", "second")
            out = torch.cat(
                [
                    _attention(heads.q[:, :, :1], k, v, layout.keep),
                    _attention(first_rows, *heads.keys(first_sees), layout.keep_of(first_sees)),
                    _attention(second_rows, *heads.keys(second_sees), layout.keep_of(second_sees)),
                ],
                dim=2,
            )
        out = out.transpose(1, 2).reshape(b, -1, h * dh)
        return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)

    def forward(self, x: Tensor, layout: _Layout, only_first: bool = False) -> Tensor:
        """x: (B, L, d) states of ``[m, first image, second image]``. Returns the new states ((B, 1, d) for m
        alone when ``only_first``)."""
        if self.normalize_before:
            x = x + self._block_attention(self.self_attn, self.norm1(x), layout, False, False)
            first = x[:, :1] if only_first else x
            x = first + self._block_attention(self.cross_attn, self.norm2(x), layout, True, only_first)
            return x + self._ff(self.norm3(x))
        x = self.norm1(x + self._block_attention(self.self_attn, x, layout, False, False))
        first = x[:, :1] if only_first else x
        x = self.norm2(first + self._block_attention(self.cross_attn, x, layout, True, only_first))
        return self.norm3(x + self._ff(x))

    def _ff(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return self.linear2(self._activation(self.linear1(x)))
        # Inference: in chunks of tokens, so the (tokens, dim_feedforward) activation stays small and its
        # memory is reused (allocating it whole for a batch of pairs makes the FFN page-fault bound).
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(flat)
        for i in range(0, flat.shape[0], _FF_CHUNK):
            out[i : i + _FF_CHUNK] = self.linear2(self._activation(self.linear1(flat[i : i + _FF_CHUNK])))
        return out.view_as(x)


class AMESDecoder(ConfigRepr, nn.Module):
    """The stack of :class:`AMESLayer` (and a final LayerNorm in the pre-norm variant)."""

    config_attributes: ClassVar[dict[str, str | None]] = {"layer_args": None}  # each layer shows its own

    def __init__(self, layer_args: dict[str, Any], num_layers: int, final_norm: bool) -> None:
        super().__init__()
        self.num_layers, self.final_norm = num_layers, final_norm
        self.layers = nn.ModuleList([AMESLayer(**layer_args) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(layer_args["d_model"]) if final_norm else None

    def forward(self, x: Tensor, layout: _Layout, only_first: bool = False) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, layout, only_first and i == len(self.layers) - 1)
        return self.norm(x) if self.norm is not None else x


@dataclass(frozen=True, repr=False)
class ProjectedDescriptors(SummaryRepr):
    """Local descriptors projected to the model dimension: what AMES consumes, and what a database caches.

    Attributes:
        tokens: (N, T, d) projected descriptors; float16 for a full-precision database (the official model
            rounds database tokens to float16 in evaluation, so this cache is lossless).
        keep: (N, T) bool, True for real descriptors (False for padding).
    """

    tokens: Tensor
    keep: Tensor


class AMES(ConfigRepr, nn.Module):
    """The AMES transformer. Arguments and parameter names follow the official code.

    Args:
        local_dim: dimension of the local descriptors (768 DINOv2, 1024 CVNet).
        model_dim: transformer width (and number of bits of the binarized variant).
        nhead: attention heads.
        num_encoder_layers: layers.
        dim_feedforward: feed-forward width.
        activation: ``"relu"`` or ``"gelu"`` (the official ``glu``/``geglu`` options do not run).
        normalize_before: pre-norm layers (and a final LayerNorm) instead of post-norm.
        binarized: project descriptors to ``model_dim`` bits first (the "dist" models).
        fusion: default (lamb, temp) for fusing its logits with global similarities in reranking (the
            builders set the authors' values, :data:`AMES_FUSION`).
        attention: ``"dense"`` (fused SDPA calls with keep masks), ``"flex"`` (block-sparse FlexAttention:
            compiled on CUDA, eager on the CPU, where it has no backward), or ``"auto"`` (flex on a CUDA device
            where ``benchmarks/bench_kernels.py`` measured it faster, see
            :data:`objretrieval.kernels.MEASURED` ``["ames_attention"]``; dense elsewhere). Same logits
            either way; :meth:`set_attention` switches a built or pretrained model.

    The builders take these arguments as overrides: ``create_model("dinov2_ames", checkpoint="mine.pt",
    num_encoder_layers=3)`` builds a 3-layer model and loads a checkpoint of that shape into it.

    Descriptors of any floating dtype (e.g. float16 files) are cast to the model's dtype; NaN/inf descriptors
    and images whose descriptors are all padding are refused, naming the image.
    """

    def __init__(
        self,
        local_dim: int = 768,
        model_dim: int = 128,
        nhead: int = 2,
        num_encoder_layers: int = 5,
        dim_feedforward: int = 1024,
        activation: Activation = "relu",
        normalize_before: bool = False,
        binarized: bool = False,
        fusion: tuple[float, float] = (0.5, 0.5),
        attention: AttentionBackend = "dense",
    ) -> None:
        super().__init__()
        self.set_attention(attention)
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        if model_dim % nhead:
            raise ValueError(f"model_dim ({model_dim}) must be divisible by nhead ({nhead})")
        self.local_dim, self.model_dim, self.binarized = local_dim, model_dim, binarized
        self.nhead, self.num_encoder_layers, self.dim_feedforward = nhead, num_encoder_layers, dim_feedforward
        self.activation, self.normalize_before = activation, normalize_before
        self.fusion = (float(fusion[0]), float(fusion[1]))
        self.mtc_token = nn.Parameter(torch.empty(model_dim))
        if binarized:
            self.remap_local = nn.Sequential(
                BinarizationLayer(local_dim, model_dim),
                nn.Linear(model_dim, model_dim),
                nn.LayerNorm(model_dim),
            )
        else:
            self.remap_local = nn.Sequential(nn.Linear(local_dim, model_dim), nn.LayerNorm(model_dim))
        layer_args = dict(
            d_model=model_dim,
            nhead=nhead,
            dim_feedforward=dim_feedforward,
            activation=activation,
            normalize_before=normalize_before,
        )
        self.decoder = AMESDecoder(layer_args, num_encoder_layers, final_norm=normalize_before)
        self.classifier = nn.Linear(model_dim, 1)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.mtc_token, std=0.02)

    def set_attention(self, attention: AttentionBackend) -> AMES:
        """Switch how attention runs (see the ``attention`` argument); returns the model.

        Raises:
            ValueError: for another value than ``"dense"``, ``"flex"``, ``"auto"``.
            ImportError: for ``"flex"`` on a torch without FlexAttention.
        """
        self.attention: AttentionBackend = check_choice(attention, "attention", AttentionBackend)
        if attention == "flex":
            _require_flex()
        return self

    def _uses_flex(self, device: torch.device) -> bool:
        if self.attention == "auto":
            return measured_faster("ames_attention", device)
        return self.attention == "flex"

    # -- inputs ----------------------------------------------------------------------------------------------
    def _check(self, local: Tensor, mask: Tensor | None, name: str) -> tuple[Tensor, Tensor]:
        """Descriptors in the model's dtype and the keep mask, refusing NaN/inf and images with no descriptor.

        Descriptors of another floating dtype are cast to the model's (parameters') dtype: float16 files halve
        the storage, and the projection runs in the model's precision as it would on float32 files (under
        autocast, the autocast dtype takes over as usual).
        """
        if not isinstance(local, Tensor) or local.ndim != 3 or local.shape[-1] != self.local_dim:
            shape = tuple(local.shape) if isinstance(local, Tensor) else type(local).__name__
            raise ValueError(f"{name} must be (B, N, {self.local_dim}) local descriptors, got {shape}")
        if not local.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {local.dtype}")
        check_finite_values(local, name)
        local = local.to(self.mtc_token.dtype)
        if mask is None:
            return local, torch.ones(local.shape[:2], dtype=torch.bool, device=local.device)
        if mask.shape != local.shape[:2]:
            raise ValueError(f"{name} mask must have shape {tuple(local.shape[:2])}, got {tuple(mask.shape)}")
        padding = mask.to(device=local.device, dtype=torch.bool)
        check_not_all_padded(padding, name, "image")
        return local, ~padding

    def remap(self, local: Tensor) -> Tensor:
        """(..., Dl) descriptors -> (..., d) tokens: L2-normalise, project (binarize), LayerNorm."""
        return self.remap_local(F.normalize(local, dim=-1))

    def project_database(self, local: Tensor, mask: Tensor | None = None) -> ProjectedDescriptors:
        """Project database descriptors once, for caching: (N, T, Dl) -> float16 tokens in evaluation.

        ``mask`` (N, T) marks padded slots (True = padding), as in the official files.
        """
        local, keep = self._check(local, mask, "database descriptors")
        tokens = self.remap(local)
        if not self.training and not self.binarized:
            tokens = tokens.half()  # the official evaluation rounds database tokens to float16
        return ProjectedDescriptors(tokens, keep)

    def binary_codes(self, local: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Packed database codes of a binarized model: (N, T, bits / 8) uint8 and (N, T) keep mask.

        128 bits take 16 bytes per descriptor, 800 bytes for an image of 50. :meth:`project_codes` turns them
        into tokens; scores are the same as from the descriptors (padded slots, whose code the official
        ``sign(0) = 0`` leaves empty, are never attended to).
        """
        if not self.binarized:
            raise ValueError("binary_codes needs a binarized model (the *_dist builders)")
        local, keep = self._check(local, mask, "database descriptors")
        return pack_bits(cast(BinarizationLayer, self.remap_local[0]).project(local) > 0), keep

    def project_codes(self, codes: Tensor, keep: Tensor) -> ProjectedDescriptors:
        """Tokens from packed codes: unpack to +1 / -1, then the rest of the projection."""
        if not self.binarized:
            raise ValueError("project_codes needs a binarized model (the *_dist builders)")
        if codes.dtype != torch.uint8 or codes.ndim != 3 or 8 * codes.shape[-1] != self.model_dim:
            raise ValueError(
                f"codes must be (N, T, {self.model_dim // 8}) uint8 packed codes of {self.model_dim} bits, "
                f"got {codes.dtype} {tuple(codes.shape)}"
            )
        check_not_all_padded(~keep, "codes", "image")
        signs = signs_from_bits(codes, self.mtc_token.dtype)
        return ProjectedDescriptors(self.remap_local[2](self.remap_local[1](signs)), keep)

    def project_query(self, local: Tensor, mask: Tensor | None = None) -> ProjectedDescriptors:
        """Project query descriptors (B, Q, Dl) (or (Q, Dl) for one query)."""
        if isinstance(local, Tensor) and local.ndim == 2:
            local = local[None]
            mask = None if mask is None else mask[None]
        local, keep = self._check(local, mask, "query descriptors")
        return ProjectedDescriptors(self.remap(local), keep)

    # -- scoring ---------------------------------------------------------------------------------------------
    def score(self, query: ProjectedDescriptors, database: ProjectedDescriptors) -> Tensor:
        """(B,) logits of projected queries against projected database images.

        ``query`` may hold one query (broadcast against every database image) or B of them.
        """
        return self._decode(query, database, only_first=True)[0]

    def _decode(
        self, query: ProjectedDescriptors, database: ProjectedDescriptors, only_first: bool
    ) -> tuple[Tensor, Tensor]:
        q_tokens, q_keep = query.tokens, query.keep
        d_tokens = database.tokens.to(q_tokens.dtype)  # float16 database caches compute in the query's dtype
        b = max(q_tokens.shape[0], d_tokens.shape[0])
        if q_tokens.shape[0] != b:
            q_tokens, q_keep = q_tokens.expand(b, -1, -1), q_keep.expand(b, -1)
        m = self.mtc_token.to(q_tokens.dtype).expand(b, 1, -1)
        flex = self._uses_flex(q_tokens.device)
        query_side, database_side = (q_tokens, q_keep), (d_tokens, database.keep)
        # FlexAttention puts the short database side first, beside m in the first tile (see the module doc)
        (first, first_keep), (second, second_keep) = (
            (database_side, query_side) if flex else (query_side, database_side)
        )
        x = torch.cat([m, first, second], dim=1)
        keep = torch.cat(
            [torch.ones(b, 1, dtype=torch.bool, device=x.device), first_keep, second_keep], dim=1
        )
        split = 1 + first.shape[1]
        masks = (
            (_block_mask(keep, split, cross=False), _block_mask(keep, split, cross=True)) if flex else None
        )
        states = self.decoder(x, _Layout(split, keep, masks), only_first=only_first)
        if flex and not only_first:  # back to the official order [m, query, database]
            states = torch.cat([states[:, :1], states[:, split:], states[:, 1:split]], dim=1)
        return self.classifier(states[:, 0]).view(-1), states

    def forward(
        self,
        src_local: Tensor,
        tgt_local: Tensor,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B,) of B (query, database) pairs.

        Args:
            src_local: (B, Q, Dl) query descriptors.
            tgt_local: (B, T, Dl) database descriptors.
            src_mask: optional (B, Q) bool, True at padded slots.
            tgt_mask: optional (B, T) bool, True at padded slots.
            return_logits: also return the final token states (B, 1 + Q + T, d), as the official code.
        """
        query = self.project_query(src_local, src_mask)
        database = self.project_database(tgt_local, tgt_mask)
        sim, states = self._decode(query, database, only_first=not return_logits)
        return (sim, states) if return_logits else sim


def _init_weights(m: nn.Module) -> None:
    """The official initialisation: truncated normal (std 0.02) linear layers, unit LayerNorms, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
    if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None:
        nn.init.zeros_(m.bias)


# -- registry --------------------------------------------------------------------------------------------------

AMES_OFFICIAL = CheckpointFormat(
    "ames_official",
    lambda obj: obj["state"],
    description="torch.save({'state': model.state_dict(), ...}) as released by pavelsuma/ames",
)

_WEIGHTS = "https://ptak.felk.cvut.cz/personal/sumapave/public/ames/networks/{}.pt"
_PAPER = "Suma et al., AMES: Asymmetric and Memory-Efficient Similarity Estimation, ECCV 2024"


def _pretrained(name: str, descriptor: str, expected: tuple[float, float, float, float]) -> PretrainedCfg:
    return PretrainedCfg(
        url=_WEIGHTS.format(name),
        sha256=None,  # the authors publish no digest and the file could not be fetched to compute one
        checkpoint_format="ames_official",
        descriptor=descriptor,
        license="see github.com/pavelsuma/ames",
        paper=_PAPER,
        notes="The checkpoint may pickle training objects: if weights_only loading refuses it, pass "
        "weights_only=False for this trusted file.",
        trained_on="GLDv2 (Google Landmarks v2)",
        expected=tuple(
            (f"{dataset} mAP, {protocol} (reranking SuperGlobal's ranking; authors' README)", value)
            for (dataset, protocol), value in zip(_PROTOCOLS, expected, strict=True)
        ),
    )


_PROTOCOLS = (("ROxford", "medium"), ("ROxford", "hard"), ("RParis", "medium"), ("RParis", "hard"))
_DINOV2 = "DINOv2 ViT-B/14-reg local descriptors, 768-d (600 per query, 50 per database image)"
_CVNET = "CVNet ResNet-101 res4 local descriptors, 1024-d, 3 scales (600 per query, 50 per database image)"


@register_model(
    pretrained=_pretrained("dinov2_ames", _DINOV2, (92.7, 83.7, 95.2, 90.6)), formats=[AMES_OFFICIAL]
)
def dinov2_ames(**overrides: Any) -> AMES:
    """AMES on DINOv2 local descriptors, full precision (ROxford M/H 92.7/83.7, RParis 95.2/90.6)."""
    return AMES(**{"local_dim": 768, "fusion": AMES_FUSION["dinov2_ames"], **overrides})


@register_model(
    pretrained=_pretrained("dinov2_ames_dist", _DINOV2 + ", binarized", (91.1, 82.2, 95.2, 90.2)),
    formats=[AMES_OFFICIAL],
)
def dinov2_ames_dist(**overrides: Any) -> AMES:
    """AMES on binarized DINOv2 local descriptors, 128 bits each (ROxford 91.1/82.2, RParis 95.2/90.2)."""
    return AMES(
        **{"local_dim": 768, "binarized": True, "fusion": AMES_FUSION["dinov2_ames_dist"], **overrides}
    )


@register_model(
    pretrained=_pretrained("cvnet_ames", _CVNET, (89.2, 78.7, 93.4, 86.8)), formats=[AMES_OFFICIAL]
)
def cvnet_ames(**overrides: Any) -> AMES:
    """AMES on CVNet local descriptors, full precision (ROxford M/H 89.2/78.7, RParis 93.4/86.8)."""
    return AMES(**{"local_dim": 1024, "fusion": AMES_FUSION["cvnet_ames"], **overrides})


@register_model(
    pretrained=_pretrained("cvnet_ames_dist", _CVNET + ", binarized", (88.8, 77.5, 93.2, 86.3)),
    formats=[AMES_OFFICIAL],
)
def cvnet_ames_dist(**overrides: Any) -> AMES:
    """AMES on binarized CVNet local descriptors, 128 bits each (ROxford 88.8/77.5, RParis 93.2/86.3)."""
    return AMES(
        **{"local_dim": 1024, "binarized": True, "fusion": AMES_FUSION["cvnet_ames_dist"], **overrides}
    )
