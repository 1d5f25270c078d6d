"""MILE (Leotescu et al., WACV 2025): one embedding for a set of images of an object, built incrementally.

Each image goes through a DINOv2 ViT with registers (timm) fine-tuned with LoRA (peft) and gives its
final-norm class token ``e_t``. The set embedding is a gated residual recurrence over the images:

    L_1 = e_1
    L_t = (1 - a) * CrossAttentionBlock(Q=L_{t-1}, KV=e_t, X=L_{t-1}) + a * L_{t-1},   a = tanh(gate_alpha)

Adding an image costs one backbone pass and one small block: earlier images are never revisited. The
result depends on the order of the images (the official data pipeline reverses the sampled file list), so
feed them in a fixed order. The embedding is not L2-normalised; MILE ranks by raw inner product.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objretrieval._validation import check_finite_values, check_padded_sets
from objretrieval.display import ConfigRepr
from objretrieval.models.heads import DINOHead, rename_weight_norm_keys
from objretrieval.models.registry import CheckpointFormat, PretrainedCfg, register_model


class MILEAggregator(ConfigRepr, nn.Module):
    """The gated cross-attention update of a set latent by one new image embedding.

    Parameter names follow the official ``CrossAttentionBlock``: separate LayerNorms (eps 1e-5) on the
    latent (``norm_q``) and the new embedding (``norm_kv``), ``nn.MultiheadAttention`` (``mha``), a
    post-attention LayerNorm and an MLP ``D -> mlp_ratio * D -> D`` with GELU, plus the scalar gate.

    Each object's latent attends to its own new embedding only: with a single key the softmax is exactly 1,
    so the attention output is ``out_proj(W_v · norm_kv(e) + b_v)`` and the query path (``norm_q``, q/k
    projections) does not influence it. :meth:`step` computes exactly that. The official training forward
    instead lets the latents of one crop index attend over the new embeddings of every object in the batch;
    :meth:`step_mixed` reproduces it for parity.

    Args:
        dim: embedding width D.
        num_heads: attention heads (1 in MILE).
        mlp_ratio: MLP hidden width over D (2 in MILE).
        gate_trainable: learn ``gate_alpha`` (MILE's ``gate_tanh``); otherwise a = tanh(0) = 0.
    """

    def __init__(self, dim: int, num_heads: int = 1, mlp_ratio: float = 2.0, gate_trainable: bool = True):
        super().__init__()
        self.dim, self.mlp_ratio = dim, mlp_ratio
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.norm_post_attn = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        hidden = int(dim * mlp_ratio)
        self.mlpblock = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        for m in self.modules():  # official init: trunc-normal linears (incl. out_proj), zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.gate_alpha = nn.Parameter(torch.tensor(0.0), requires_grad=gate_trainable)

    @property
    def num_heads(self) -> int:
        return self.mha.num_heads

    @property
    def gate_trainable(self) -> bool:
        """Whether ``gate_alpha`` learns, read from the parameter (it may have been frozen since)."""
        return self.gate_alpha.requires_grad

    @property
    def gate(self) -> Tensor:
        """a = tanh(gate_alpha): the share of the previous latent kept at each update."""
        return torch.tanh(self.gate_alpha)

    def _residual(self, latent: Tensor, attended: Tensor) -> Tensor:
        h = attended + latent
        out = self.mlpblock(self.norm_post_attn(h)) + h
        a = self.gate
        return (1 - a) * out + a * latent

    def step(self, latent: Tensor, features: Tensor) -> Tensor:
        """Update latents (..., D) with one new image embedding each (..., D); objects stay independent."""
        d = self.dim
        w_v, b_v = self.mha.in_proj_weight[2 * d :], self.mha.in_proj_bias[2 * d :]
        value = F.linear(self.norm_kv(features), w_v, b_v)
        return self._residual(latent, self.mha.out_proj(value))

    def step_mixed(self, latent: Tensor, features: Tensor) -> Tensor:
        """The official batched update: latents (G, n, D) attend over all n new embeddings of their group."""
        q, kv = self.norm_q(latent), self.norm_kv(features)
        attended = self.mha(q, kv, kv, need_weights=False)[0]
        return self._residual(latent, attended)

    def forward(
        self,
        features: Tensor,
        mask: Tensor | None = None,
        *,
        return_steps: bool = False,
        mixing_groups: int | None = None,
    ) -> Tensor:
        """Aggregate a sequence of image embeddings per set, in order.

        Args:
            features: (S, N, D) embeddings of the N images of S sets, in feed order.
            mask: optional (S, N) bool, True at padded images, which leave the latent unchanged. Every set
                needs at least one image, and unpadded embeddings must be finite.
            return_steps: return the latent after each image, (S, N, D), instead of the last one.
            mixing_groups: official batch-mixing mode for parity with upstream training: the S sets are
                G groups of S / G (group-major), and each latent attends over its group's new embeddings.

        Returns:
            (S, D) set embeddings, or (S, N, D) per-step latents.
        """
        if features.ndim != 3 or features.shape[-1] != self.dim:
            raise ValueError(f"features must be (sets, images, {self.dim}), got {tuple(features.shape)}")
        s, n, _ = features.shape
        if n == 0:
            raise ValueError("features has no images (second dimension is 0)")
        mask = check_padded_sets(features, "features", mask)
        if mask is not None and not bool(mask.any()):
            mask = None
        if mixing_groups is not None:
            if mask is not None:
                raise ValueError("mixing_groups (official batch mixing) does not support padding masks")
            if s % mixing_groups:
                raise ValueError(f"mixing_groups={mixing_groups} does not divide the {s} sets")

        def update(latent: Tensor, e: Tensor) -> Tensor:
            if mixing_groups is None:
                return self.step(latent, e)
            return self.step_mixed(
                latent.reshape(mixing_groups, -1, self.dim), e.reshape(mixing_groups, -1, self.dim)
            ).reshape(s, self.dim)

        if mask is None:
            latent = features[:, 0]
            steps = [latent]
            for t in range(1, n):
                latent = update(latent, features[:, t])
                steps.append(latent)
        else:
            # a set starts at its first unpadded image; padded images keep the latent as it is
            latent = torch.zeros_like(features[:, 0])
            started = torch.zeros(s, dtype=torch.bool, device=features.device)
            steps = []
            for t in range(n):
                valid = ~mask[:, t]
                updated = update(latent, features[:, t]) if t else latent
                new = torch.where(started[:, None], updated, features[:, t])
                latent = torch.where(valid[:, None], new, latent)
                started = started | valid
                steps.append(latent)
        return torch.stack(steps, dim=1) if return_steps else latent


class MILE(ConfigRepr, nn.Module):
    """MILE: a LoRA-tuned DINOv2 ViT with registers and the incremental set aggregator.

    Args:
        backbone: a timm model name (built with ``dynamic_img_size=True`` and no classifier) or a built timm
            ViT whose ``forward_features`` returns tokens with the class token first.
        backbone_kwargs: extra arguments for ``timm.create_model`` (e.g. a smaller ``embed_dim``).
        pretrained_backbone: load timm's DINOv2 weights (downloads from the Hugging Face hub).
        lora_r: LoRA rank on every ``qkv`` (48); 0 keeps the plain backbone, all of it trainable.
        lora_alpha: LoRA alpha (16; scaling alpha / r = 1/3).
        lora_dropout: LoRA dropout in training mode (0.1).
        lora_bias: peft's ``bias`` option ("lora_only": the qkv biases train too).
        cross_heads: attention heads of the :class:`MILEAggregator` (1).
        cross_mlp_ratio: its MLP width over D (2).
        gate_trainable: learn the gate (MILE's ``gate_tanh``).
        head_dim: output width of the DINO head used in self-supervised training (65,536 in MILE); None
            builds no head (retrieval only).
        head_hidden_dim: the DINO head's hidden width (2048).
        head_bottleneck_dim: its bottleneck width before the weight-normalised layer (256).
        head_layers: its MLP depth (3).
        norm_last_layer: freeze the last layer's weight-norm magnitude (the README trains with False).

    Forward: ``model(images)`` with images (B, N, 3, H, W) and an optional (B, N) padding mask gives the
    (B, D) set embeddings.
    """

    # the repr reads the aggregator's and the head's arguments back from them (absent without a head)
    config_attributes: ClassVar[dict[str, str | None]] = {
        "backbone": "backbone_name",
        "cross_heads": "aggregator.num_heads",
        "cross_mlp_ratio": "aggregator.mlp_ratio",
        "gate_trainable": "aggregator.gate_trainable",
        "head_hidden_dim": "head.hidden_dim",
        "head_bottleneck_dim": "head.bottleneck_dim",
        "head_layers": "head.nlayers",
        "norm_last_layer": "head.norm_last_layer",
    }
    #: the timm name the backbone was built from (absent when a built model was passed)
    backbone_name: str

    def __init__(
        self,
        backbone: str | nn.Module = "vit_large_patch14_reg4_dinov2",
        *,
        backbone_kwargs: Mapping[str, Any] | None = None,
        pretrained_backbone: bool = False,
        lora_r: int = 48,
        lora_alpha: int = 16,
        lora_dropout: float = 0.1,
        lora_bias: str = "lora_only",
        cross_heads: int = 1,
        cross_mlp_ratio: float = 2.0,
        gate_trainable: bool = True,
        head_dim: int | None = None,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.pretrained_backbone, self.backbone_kwargs = pretrained_backbone, backbone_kwargs
        self.lora_r, self.lora_alpha, self.lora_dropout = lora_r, lora_alpha, lora_dropout
        self.lora_bias = lora_bias
        self.head_dim = head_dim
        if isinstance(backbone, str):
            self.backbone_name = backbone
            import timm

            kwargs = {"num_classes": 0, "dynamic_img_size": True, **(backbone_kwargs or {})}
            backbone = timm.create_model(backbone, pretrained=pretrained_backbone, **kwargs)
        elif backbone_kwargs or pretrained_backbone:
            raise ValueError("backbone_kwargs and pretrained_backbone apply only to a timm model name")
        if lora_r > 0:
            import peft

            config = peft.LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                target_modules=["qkv"],
                lora_dropout=lora_dropout,
                bias=lora_bias,  # type: ignore[arg-type]
            )
            # in place; freezes everything in the ViT but the adapters (and the qkv biases for "lora_only")
            backbone = peft.inject_adapter_in_model(config, backbone)
        self.backbone: Any = backbone
        dim = int(backbone.embed_dim)  # type: ignore[arg-type]
        self.embed_dim = dim
        self.aggregator = MILEAggregator(dim, cross_heads, cross_mlp_ratio, gate_trainable)
        self.head = (
            DINOHead(
                dim,
                head_dim,
                nlayers=head_layers,
                hidden_dim=head_hidden_dim,
                bottleneck_dim=head_bottleneck_dim,
                norm_last_layer=norm_last_layer,
            )
            if head_dim
            else None
        )

    def merge_lora(self, merge: bool = True) -> MILE:
        """Fold the LoRA update into the qkv weights (``W + (alpha / r) B A``) for faster inference, or undo
        it with ``merge=False``. The state dict keeps its keys; merged models should not be trained."""
        from peft.tuners.lora import LoraLayer

        for module in self.backbone.modules():
            if isinstance(module, LoraLayer):
                if merge and not module.merged:
                    module.merge()
                elif not merge and module.merged:
                    module.unmerge()
        return self

    def encode_images(self, images: Tensor) -> Tensor:
        """Per-image embeddings: (B, 3, H, W) normalised images -> (B, D) final-norm class tokens.

        Images of one call share a resolution; H and W should be multiples of the patch size (14). The
        positional embedding is resized bicubically with antialiasing, as DINOv2 does. NaN or inf pixels
        raise, naming the image.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        check_finite_values(images, "images")
        return self.backbone.forward_features(images)[:, 0]

    def encode_sets(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-image embeddings of sets: (B, N, ..., 3, H, W) -> (B, N, ..., D), e.g. (B, N, crops, 3, H, W).

        Images of the sets padded by ``mask`` ((B, N) bool, True at padding) never reach the backbone; their
        embeddings are zero. A set with no unpadded image, or NaN/inf in an unpadded one, raises naming the set.
        """
        if images.ndim < 5 or images.shape[-3] != 3:
            raise ValueError(f"images must be (B, N, ..., 3, H, W), got {tuple(images.shape)}")
        return self._encode_valid_sets(images, check_padded_sets(images, "images", mask))

    def _encode_valid_sets(self, images: Tensor, mask: Tensor | None) -> Tensor:
        """:meth:`encode_sets` without the checks, for inputs already validated (a training step checks its
        batch once, then encodes it several times)."""
        kept = images if mask is None else images[~mask]
        encoded = self.backbone.forward_features(kept.flatten(0, -4))[:, 0].view(*kept.shape[:-3], -1)
        if mask is None:
            return encoded
        features = encoded.new_zeros(*images.shape[:-3], encoded.shape[-1])
        features[~mask] = encoded
        return features

    def aggregate(
        self, features: Tensor, mask: Tensor | None = None, *, return_steps: bool = False
    ) -> Tensor:
        """Set embeddings from per-image embeddings (B, N, D) (e.g. cached :meth:`encode_images` outputs)."""
        return self.aggregator(features, mask, return_steps=return_steps)

    def update(
        self, latent: Tensor | None, images: Tensor | None = None, *, features: Tensor | None = None
    ) -> Tensor:
        """Add one image to each of B sets: O(1) per image, earlier images are not recomputed.

        Args:
            latent: (B, D) current set embeddings, or None to start the sets.
            images: (B, 3, H, W) the next image of each set, or
            features: (B, D) its cached :meth:`encode_images` output.

        Returns:
            (B, D) the updated set embeddings (equal to :meth:`forward` on all images so far).
        """
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images and features")
        if features is None:
            assert images is not None
            e = self.encode_images(images)
        else:
            e = features
            if e.ndim != 2 or e.shape[1] != self.embed_dim:
                raise ValueError(f"features must be (B, {self.embed_dim}), got {tuple(e.shape)}")
            check_finite_values(e, "features")
        if latent is None:
            return e
        if latent.shape != e.shape:
            raise ValueError(
                f"latent has shape {tuple(latent.shape)} but the new image gives {tuple(e.shape)}"
            )
        check_finite_values(latent, "latent")
        return self.aggregator.step(latent, e)

    def project(self, latent: Tensor) -> Tensor:
        """The DINO head's output for set embeddings (training only)."""
        if self.head is None:
            raise RuntimeError("this MILE model has no head; build it with head_dim=... to train it")
        return self.head(latent)

    def forward(self, images: Tensor, mask: Tensor | None = None, *, return_steps: bool = False) -> Tensor:
        """Set embeddings of B sets of N images.

        Args:
            images: (B, N, 3, H, W) normalised images, each set in feed order.
            mask: optional (B, N) bool, True at padding; padded images are not run through the backbone.
            return_steps: return (B, N, D), the embedding after each image, instead of (B, D).
        """
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be (B, N, 3, H, W), got {tuple(images.shape)}")
        return self.aggregator(self.encode_sets(images, mask), mask, return_steps=return_steps)


# -- official checkpoints --------------------------------------------------------------------------------------

_OFFICIAL_BACKBONE = "backbone.backbone.base_model.model."
_OFFICIAL_RENAMES = {"latent_cross.": "aggregator.", "final_projection.": "head."}


def _dinov2_to_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """DINOv2 ViT keys -> timm's ``vit_*_reg4_dinov2`` layout (class position folded into the class token)."""
    out: dict[str, Tensor] = {}
    pos = state["pos_embed"]
    for key, value in state.items():
        if key == "mask_token":  # masked-image modelling token, unused here
            continue
        if key == "pos_embed":
            value = pos[:, 1:]
        elif key == "cls_token":
            value = value + pos[:, :1]
        elif key == "register_tokens":
            key = "reg_token"
        out[key] = value
    return out


def convert_official_mile(obj: Any, *, keep_head: bool = True) -> dict[str, Tensor]:
    """An official MILE checkpoint (``{'teacher': ..., 'student': ...}`` or the wrapper's state dict) -> ours.

    The teacher is read when both are present (the official inference default). DINOv2 keys become timm's,
    ``latent_cross`` the aggregator, ``final_projection`` the head (dropped unless ``keep_head``), and the
    unused ``dual_gate_alpha`` is dropped.
    """
    if isinstance(obj, Mapping) and "teacher" in obj:
        obj = obj["teacher"]
    if not isinstance(obj, Mapping) or not any(str(k).endswith("gate_alpha") for k in obj):
        raise KeyError("not an official MILE state dict (no gate_alpha)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    backbone = {k[len(_OFFICIAL_BACKBONE) :]: v for k, v in state.items() if k.startswith(_OFFICIAL_BACKBONE)}
    if not backbone:
        raise KeyError(f"no backbone keys under {_OFFICIAL_BACKBONE!r}")
    out = {"backbone." + k: v for k, v in _dinov2_to_timm(backbone).items()}
    for key, value in state.items():
        if key.startswith(_OFFICIAL_BACKBONE) or key == "dual_gate_alpha":
            continue
        if key == "gate_alpha":
            out["aggregator.gate_alpha"] = value
            continue
        for old, new in _OFFICIAL_RENAMES.items():
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            raise KeyError(f"unexpected key in an official MILE checkpoint: {key}")
    if not keep_head:
        return {k: v for k, v in out.items() if not k.startswith("head.")}
    return rename_weight_norm_keys(out, "head.last_layer.")


MILE_OFFICIAL = CheckpointFormat(
    "mile_official",
    lambda obj: convert_official_mile(obj, keep_head=False),
    safe_globals=(argparse.Namespace,),  # the training arguments pickled beside the weights
    description="amazon-science/MILE training checkpoint ({'teacher': ..., 'student': ...}), DINO head dropped",
)
MILE_OFFICIAL_WITH_HEAD = CheckpointFormat(
    "mile_official_with_head",
    convert_official_mile,
    safe_globals=(argparse.Namespace,),
    description="amazon-science/MILE checkpoint including the DINO head (for models built with head_dim)",
)

_PAPER = (
    "Leotescu et al., Self-Supervised Incremental Learning of Object Representations from Arbitrary Image "
    "Sets, WACV 2025"
)
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _mile(backbone: str, overrides: Mapping[str, Any]) -> MILE:
    return MILE(**{"backbone": backbone, **overrides})


_HF = "https://huggingface.co/AmazonScience/MILE/resolve/main/"


def _pretrained(file: str, notes: str, expected: tuple[tuple[str, float], ...]) -> PretrainedCfg:
    return PretrainedCfg(
        url=_HF + file,
        sha256=None,  # not published, and the file could not be fetched here to compute it
        checkpoint_format="mile_official",
        input_size=(3, 224, 224),
        mean=_MEAN,
        std=_STD,
        interpolation="bilinear",
        descriptor="set embedding, 1024-d, ranked by raw inner product",
        license="CC-BY-NC-4.0",
        paper=_PAPER,
        notes=notes,
        trained_on="an internal Amazon product-image set (objects with more than 4 unique images), not released",
        expected=expected,
    )


@register_model(
    pretrained={
        "default": _pretrained(
            "blrp-dinov2-vitl14-reg-lora0-fw-5e-06-mt09996-bs3-800_ckpt0390.pth",
            "Teacher of the authors' run behind the paper's ABO AR@10 86.33 (epoch 390).",
            (("ABO AR@10 x 100 (paper)", 86.33),),
        ),
        "100m": _pretrained(
            "mile-vitl14-reg-LRx8-g48x8-100M-mt0996-bs3-s250000-ep800-1_ckpt0361.pth",
            "The authors' second release (trained on a larger internal set).",
            (("ABO AR@10 x 100 (the authors' test.sh)", 85.90),),
        ),
    },
    formats=[MILE_OFFICIAL, MILE_OFFICIAL_WITH_HEAD],
)
def mile_vitl(**overrides: Any) -> MILE:
    """MILE on DINOv2 ViT-L/14 with 4 registers, LoRA r=48 alpha=16 on qkv (ABO AR@10 86.33)."""
    return _mile("vit_large_patch14_reg4_dinov2", overrides)


@register_model(formats=[MILE_OFFICIAL, MILE_OFFICIAL_WITH_HEAD])
def mile_vitb(**overrides: Any) -> MILE:
    """MILE on DINOv2 ViT-B/14 with 4 registers (no released weights; train with objretrieval.training)."""
    return _mile("vit_base_patch14_reg4_dinov2", overrides)


@register_model(formats=[MILE_OFFICIAL, MILE_OFFICIAL_WITH_HEAD])
def mile_vits(**overrides: Any) -> MILE:
    """MILE on DINOv2 ViT-S/14 with 4 registers (no released weights; train with objretrieval.training)."""
    return _mile("vit_small_patch14_reg4_dinov2", overrides)
