"""Parity with the official AVSL code (Zhang et al., CVPR 2022): embedder, similarity graph, losses, links,
eval-mode distances and the default checkpoint layout.

The configuration, the step sequence's tensor names and the tolerances come from the fixture manifest; the
tensor names are the fixture format's (``batch1.train.embed_0``...).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from objretrieval import create_model
from objretrieval.losses import AVSLPairwiseProxyAnchorLoss, AVSLProxyAnchorLoss
from objretrieval.models import AVSL, AVSLScorer, convert_official_avsl, load_state_dict_into
from objretrieval.models.avsl import topk_mask
from tests.parity.fixtures import (
    MethodFixtures,
    assert_close,
    key_listing_files,
    method_fixtures,
    parse_tolerance,
    random_state,
)

FILE = "avsl_forward.safetensors"


@pytest.fixture(scope="module")
def avsl() -> MethodFixtures:
    return method_fixtures("avsl")


def _spec(avsl: MethodFixtures) -> dict[str, Any]:
    return avsl.manifest["fixtures"][FILE]


def _tol(spec: dict[str, Any], what: str) -> tuple[float, float]:
    """The tolerance whose key names ``what`` ("metrics" is found in "forward/metrics/links/certainty")."""
    for key, value in spec["tolerance"].items():
        if what in key.split("/"):
            return parse_tolerance(value)
    raise AssertionError(f"no tolerance for {what!r} in {sorted(spec['tolerance'])}")


def _section(t: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}


def _levels(config: dict[str, Any]) -> range:
    return range(len(config["feature_dim_list"]))


def _maps(
    t: dict[str, torch.Tensor], batch: str, config: dict[str, Any], grad: bool = False
) -> list[torch.Tensor]:
    return [t[f"{batch}.features_{lv}"].clone().requires_grad_(grad) for lv in _levels(config)]


def _build(spec: dict[str, Any], t: dict[str, torch.Tensor]) -> tuple[AVSL, AVSLProxyAnchorLoss]:
    """The trunk-less model and the Proxy-Anchor loss of the manifest config, loaded from ``init.*``."""
    c = spec["config"]
    model = AVSL(
        None,
        in_channels=c["feature_dim_list"],
        embed_dim=c["embed_dim"],
        topk=c["topk_corr"],
        gamma=c["prob_gamma"],
        momentum=c["m"],
        p=c["index_p"],
        official_certainty=True,
    )
    collector = _section(t, "init.collector.")
    dim = c["embed_dim"]
    for lv in list(_levels(c))[:-1]:  # link buffers start at zero and are not part of init.*
        collector.setdefault(f"link_{lv}to{lv + 1}", torch.zeros(dim, dim))
    state = convert_official_avsl({"embedder": _section(t, "init.embedder."), "collector": collector})
    load_state_dict_into(model, state)
    pos, neg, alpha = c["ProxyAnchor_pos_margin_neg_margin_alpha"]
    loss = AVSLProxyAnchorLoss(
        c["num_classes"],
        dim,
        num_levels=len(c["feature_dim_list"]),
        level_weights=c["loss_weights"],
        pos_margin=pos,
        neg_margin=neg,
        alpha=alpha,
        final_pos_margin=pos,
        final_neg_margin=neg,
        final_alpha=alpha,
    )
    loss.load_official_proxies(collector)
    return model, loss


def _our_grads(model: AVSL, loss: AVSLProxyAnchorLoss, c: dict[str, Any]) -> dict[str, torch.Tensor | None]:
    """Gradients under the official names (parameters we do not have are absent)."""
    grads: dict[str, torch.Tensor | None] = {}
    for lv in _levels(c):
        conv = model.embedder.projections[lv]
        grads[f"embedder.conv1x1_{lv}.weight"] = conv.weight.grad
        grads[f"embedder.conv1x1_{lv}.bias"] = conv.bias.grad
        grads[f"collector.proxy_{lv}"] = None if loss.proxies.grad is None else loss.proxies.grad[lv]
        if lv >= 1:
            s, b = model.similarity.reliability_scale.grad, model.similarity.reliability_bias.grad
            grads[f"collector.prob_coef_{lv}"] = None if s is None else s[lv - 1]
            grads[f"collector.prob_bias_{lv}"] = None if b is None else b[lv - 1]
    return grads


def test_training_step_matches(avsl: MethodFixtures) -> None:
    spec = _spec(avsl)
    c, t = spec["config"], avsl.tensors(FILE)
    fwd, losses, grads = _tol(spec, "forward"), _tol(spec, "losses"), _tol(spec, "grads")
    model, loss = _build(spec, t)
    model.train()
    maps = _maps(t, "batch1", c, grad=True)
    feats = model.forward_features(maps)
    labels = t["batch1.labels"]
    assert feats.links is not None
    for lv in _levels(c):
        assert_close(feats.embeddings[lv], t[f"batch1.train.embed_{lv}"], fwd, f"embed_{lv}")
        assert_close(feats.certainties[lv], t[f"batch1.train.certainty_{lv}"], fwd, f"certainty_{lv}")
    for lv, link in enumerate(feats.links):
        assert_close(link, t[f"batch1.train.link_{lv}to{lv + 1}"], fwd, f"batch link {lv}")
        assert_close(
            model.similarity.links[lv], t[f"after_batch1.collector.link_{lv}to{lv + 1}"], fwd, "link"
        )

    matrices, _ = loss.distances(model, feats, labels)
    assert_close(matrices.final, t["batch1.train.metric_final"], fwd, "metric_final")
    for lv, d in enumerate(matrices.levels):
        assert_close(d, t[f"batch1.train.metric_level{lv}"], fwd, f"metric_level{lv}")

    out = loss(model, feats, labels)
    assert_close(out.final, t["batch1.train.loss_final"], losses, "loss_final")
    for lv, value in enumerate(out.levels):
        assert_close(value, t[f"batch1.train.loss_level{lv}"], losses, f"loss_level{lv}")
    assert_close(out.loss, t["batch1.train.loss_total"], losses, "loss_total")

    # the final loss alone reaches only the reliabilities, never the embedder
    out.final.backward(retain_graph=True)
    leaked = [float(p.grad.abs().max()) for p in model.embedder.parameters() if p.grad is not None]
    assert max(leaked, default=0.0) == spec["final_only_grad_to_embedder"]
    assert model.similarity.reliability_scale.grad is not None
    model.zero_grad(set_to_none=True)
    loss.zero_grad(set_to_none=True)
    for m in maps:
        m.grad = None

    out.loss.backward()
    ours = _our_grads(model, loss, c)
    expected = _section(t, "batch1.train.grad.")
    for name, value in expected.items():
        if name.startswith("features_"):
            assert_close(maps[int(name.split("_")[1])].grad, value, grads, f"grad {name}")
        elif bool(torch.isnan(value).all()):  # the official parameter received no gradient
            assert ours.get(name) is None, f"{name} gets a gradient from us but none officially"
        else:
            assert ours[name] is not None, f"no gradient for {name}"
            assert_close(ours[name], value, grads, f"grad {name}")


def test_links_moving_average_and_pairwise_mode(avsl: MethodFixtures) -> None:
    spec = _spec(avsl)
    c, t = spec["config"], avsl.tensors(FILE)
    fwd, losses = _tol(spec, "forward"), _tol(spec, "losses")
    model, loss = _build(spec, t)
    model.train()
    with torch.no_grad():
        model.forward_features(_maps(t, "batch1", c))
        feats2 = model.forward_features(_maps(t, "batch2", c))
        assert feats2.links is not None
        for lv, link in enumerate(feats2.links):
            assert_close(link, t[f"batch2.train.link_{lv}to{lv + 1}"], fwd, f"batch2 link {lv}")
            assert_close(
                model.similarity.links[lv], t[f"after_batch2.collector.link_{lv}to{lv + 1}"], fwd, "EMA"
            )
        matrices, _ = loss.distances(model, feats2, t["batch2.labels"])
        assert_close(matrices.final, t["batch2.train.metric_final"], fwd, "batch2 metric_final")

    # the proxy collector's state after these steps (what a checkpoint holds) converts to ours
    final = convert_official_avsl(
        {"embedder": _section(t, "init.embedder."), "collector": _section(t, "final.collector.")}
    )
    for key in ("similarity.reliability_scale", "similarity.reliability_bias", "similarity.links"):
        assert_close(model.state_dict()[key], final[key], fwd, key)

    # pairwise (non-proxy) mode on batch 1, with one more EMA step (a separate collector officially)
    pos, neg, alpha = c["ProxyAnchor_pos_margin_neg_margin_alpha"]
    pairwise = AVSLPairwiseProxyAnchorLoss(len(c["feature_dim_list"]), c["loss_weights"], pos, neg, alpha)
    feats = model.forward_features(_maps(t, "batch1", c))
    for lv in _levels(c)[:-1]:
        expected = t[f"pairwise.after.collector.link_{lv}to{lv + 1}"]
        assert_close(model.similarity.links[lv], expected, fwd, "pairwise EMA")
    matrices = model.similarity(feats, feats)
    assert_close(matrices.final, t["pairwise.train.metric_final"], fwd, "pairwise metric_final")
    for lv, d in enumerate(matrices.levels):
        assert_close(d, t[f"pairwise.train.metric_level{lv}"], fwd, f"pairwise metric_level{lv}")
    out = pairwise(model, feats, t["batch1.labels"])
    assert_close(
        torch.stack([out.final, *out.levels]), t["pairwise.train.losses_final_l0_l1_l2"], losses, "losses"
    )


def test_eval_distances(avsl: MethodFixtures) -> None:
    spec = _spec(avsl)
    c, t = spec["config"], avsl.tensors(FILE)
    fwd = _tol(spec, "forward")
    model, _ = _build(spec, t)
    model.train()
    with torch.no_grad():  # bring the links to their after-batch-2 state
        model.forward_features(_maps(t, "batch1", c))
        model.forward_features(_maps(t, "batch2", c))
    model.eval()
    with torch.no_grad():
        q = model.forward_features(_maps(t, "batch1", c))
        g = model.forward_features(_maps(t, "batch2", c))
    assert q.links is None
    for lv in _levels(c):
        for name, f in (("query", q), ("gallery", g)):
            assert_close(f.embeddings[lv], t[f"eval.{name}.embed_{lv}"], fwd, f"eval {name} embed_{lv}")
            assert_close(
                f.certainties[lv], t[f"eval.{name}.certainty_{lv}"], fwd, f"eval {name} certainty_{lv}"
            )
    expected_qg, expected_qq = t["eval.metric_query_gallery"], t["eval.metric_query_query"]
    assert_close(model.distance(q, g), expected_qg, fwd, "query x gallery")
    # block sizes (the official split_num slices rows) must not change anything
    for block in (1, c["split_num"], len(q)):
        scorer = AVSLScorer(model, q, g)
        assert_close(-scorer.full_scores(block_size=block), expected_qg, fwd, f"blocks of {block}")
    self_scores = -AVSLScorer(model, q).full_scores(block_size=c["split_num"])
    assert_close(self_scores, expected_qq, fwd, "query x query")
    rows, cols = torch.meshgrid(torch.arange(len(q)), torch.arange(len(g)), indexing="ij")
    pairs = -AVSLScorer(model, q, g).score_pairs(rows.flatten(), cols.flatten())
    assert_close(pairs.view_as(expected_qg), expected_qg, fwd, "paired scoring")


def test_topk_mask(avsl: MethodFixtures) -> None:
    t = avsl.tensors(FILE)
    name = next(k for k in t if k.startswith("topk_mask.k"))  # topk_mask.k<K>_dim<D>
    k, dim = (int(v) for v in name[len("topk_mask.k") :].split("_dim"))
    assert torch.equal(topk_mask(t["topk_mask.input"], k, dim=dim), t[name].bool())


@pytest.mark.parametrize("listing_file", key_listing_files("avsl"))
def test_default_checkpoint_layout_loads_strictly(avsl: MethodFixtures, listing_file: str) -> None:
    """The official default files (ResNet50 trunk, 512-d embedder, collectors for each dataset) load strictly."""
    listing = avsl.json(listing_file)
    trunk = next(v for k, v in listing.items() if "trunk" in k)
    embedder = next(v for k, v in listing.items() if "embedder" in k)
    collectors = [v for k, v in listing.items() if "collector" in k]
    assert collectors
    embed_dim = embedder["conv1x1_0.weight"][0][0]
    for collector in collectors:
        state = {
            "trunk": random_state(trunk),
            "embedder": random_state(embedder),
            "collector": random_state(collector),
        }
        model = create_model("avsl_resnet50", checkpoint=state, embed_dim=embed_dim)
        assert isinstance(model, AVSL)
        assert torch.equal(model.embedder.projections[2].weight, state["embedder"]["conv1x1_2.weight"])
        assert torch.equal(model.trunk.layer4[2].conv3.weight, state["trunk"]["model.layer4.2.conv3.weight"])
        # the proxies, which the model does not hold, load into the loss
        num_classes, dim = collector["proxy_0"][0]
        loss = AVSLProxyAnchorLoss(num_classes, dim)
        loss.load_official_proxies(state["collector"])
        assert torch.equal(loss.proxies[1], state["collector"]["proxy_1"])
