"""AVSL: the model's pieces against the spec's formulas, the blocked pairwise scorer, losses, checkpoints,
explanations and the input checks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from objretrieval import RetrievalEvaluator, create_model
from objretrieval.losses import AVSLMarginLoss, AVSLPairwiseProxyAnchorLoss, AVSLProxyAnchorLoss
from objretrieval.models import (
    AVSL,
    AttributableSimilarity,
    AVSLFeatures,
    AVSLScorer,
    ResNetTrunk,
    read_official_avsl,
)
from objretrieval.models.avsl import certainty
from objretrieval.search import pairwise_knn

E = 16


def _features(n: int, seed: int = 0, dim: int = E, levels: int = 3) -> AVSLFeatures:
    g = torch.Generator().manual_seed(seed)
    return AVSLFeatures(
        tuple(torch.randn(n, dim, generator=g) for _ in range(levels)),
        tuple(0.05 + 0.1 * torch.rand(n, dim, generator=g) for _ in range(levels)),
    )


def _trained_like(model: AVSL | AttributableSimilarity, seed: int = 0) -> AttributableSimilarity:
    sim = model.similarity if isinstance(model, AVSL) else model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sim.links.copy_(torch.randn(sim.links.shape, generator=g))
        sim.num_link_updates.fill_(1)
        sim.reliability_scale.copy_(torch.randn(sim.reliability_scale.shape, generator=g))
        sim.reliability_bias.copy_(0.1 * torch.randn(sim.reliability_bias.shape, generator=g))
    return sim


def _naive_distance(sim: AttributableSimilarity, a: AVSLFeatures, b: AVSLFeatures, i: int, j: int) -> float:
    """The spec's formula for one pair, written out node by node in float64."""
    hat = None
    for lv in range(sim.num_levels):
        x = F.normalize(a.embeddings[lv][i].double(), dim=0)
        y = F.normalize(b.embeddings[lv][j].double(), dim=0)
        d = (x - y).abs() ** 2
        if hat is None:
            hat = d
            continue
        link = sim.links[lv - 1].double().clamp(min=0)
        w = torch.zeros_like(link)
        for n in range(sim.embed_dim):  # column n: its top-k lower nodes, normalised
            top = link[:, n].topk(sim.topk).indices
            w[top, n] = link[top, n]
            w[:, n] /= w[:, n].sum() + 1e-8
        trans = torch.stack([(hat * w[:, n]).sum() for n in range(sim.embed_dim)])
        c = a.certainties[lv][i].double() * b.certainties[lv][j].double()
        p = torch.sigmoid(
            sim.gamma * (c * sim.reliability_scale[lv - 1].double() + sim.reliability_bias[lv - 1])
        )
        hat = p * d + (1 - p) * trans
    assert hat is not None
    return float(hat.sum())


def test_distance_follows_the_formula() -> None:
    sim = _trained_like(AttributableSimilarity(E, topk=5))
    a, b = _features(4, 1), _features(3, 2)
    with torch.no_grad():
        got = sim(a, b).final
    with torch.no_grad():
        pairs = [[_naive_distance(sim, a, b, i, j) for j in range(3)] for i in range(4)]
    expected = torch.tensor(pairs, dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # the level distances are squared distances of normalised embeddings
    levels = sim(a, b).levels
    expected_l2 = torch.cdist(F.normalize(a.embeddings[2], dim=1), F.normalize(b.embeddings[2], dim=1)) ** 2
    torch.testing.assert_close(levels[2].detach(), expected_l2, rtol=1e-5, atol=1e-6)


def test_final_distance_trains_only_the_reliabilities() -> None:
    sim = _trained_like(AttributableSimilarity(E, topk=5))
    feats = _features(5)
    feats = AVSLFeatures(tuple(e.requires_grad_() for e in feats.embeddings), feats.certainties)
    sim(feats, feats).final.sum().backward()
    assert all(e.grad is None for e in feats.embeddings)
    assert sim.reliability_scale.grad is not None and bool(sim.reliability_scale.grad.abs().sum() > 0)


def test_activation_maps_average_to_the_embedding() -> None:
    """The max-location term makes each node's map average exactly to the pooled embedding (spec 3)."""
    model = AVSL(None, in_channels=(6, 7, 8), embed_dim=E)
    maps = [torch.rand(3, c, s, s) for c, s in ((6, 8), (7, 4), (8, 2))]
    cams = model.embedder.activation_maps(maps)
    for emb, cam in zip(model.embedder.embeddings(maps), cams, strict=True):
        torch.testing.assert_close(cam.mean(dim=(-2, -1)), emb.detach(), rtol=1e-5, atol=1e-5)


def test_certainty_prefers_peaky_maps_and_offers_the_official_variant() -> None:
    flat = torch.ones(1, 1, 4, 4)
    peaky = torch.zeros(1, 1, 4, 4)
    peaky[..., 1, 2] = 5.0
    assert float(certainty(peaky)) > float(certainty(flat + 0.01 * torch.rand(1, 1, 4, 4)))
    # rows with different minima: the paper shifts by the map minimum, the official code by each row's
    ramp = torch.arange(4.0)[:, None].expand(4, 4)[None, None]
    assert float(certainty(ramp)) > 0
    assert float(certainty(ramp, official=True)) == 0.0  # every row is constant, so each becomes zero


def test_links_copy_then_moving_average() -> None:
    sim = AttributableSimilarity(E, momentum=0.25)
    first, second = [torch.rand(E, E), torch.rand(E, E)], [torch.rand(E, E), torch.rand(E, E)]
    sim.update_links(first)
    torch.testing.assert_close(sim.links, torch.stack(first))
    sim.update_links(second)
    torch.testing.assert_close(sim.links, 0.25 * torch.stack(first) + 0.75 * torch.stack(second))
    assert int(sim.num_link_updates) == 2
    with pytest.raises(ValueError, match="expected 2 link estimates"):
        sim.update_links(first[:1])


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sim = AttributableSimilarity(4, num_levels=2)
    sim.update_links([torch.full((4, 4), float(rank + 1))])
    torch.save(sim.links.clone(), f"{out}/links{rank}.pt")
    dist.destroy_process_group()


def test_links_agree_across_ddp_ranks(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    links = [torch.load(tmp_path / f"links{r}.pt") for r in range(2)]
    assert torch.equal(links[0], links[1])
    assert torch.equal(links[0], torch.full((1, 4, 4), 1.5))  # the mean of the ranks' estimates


def test_model_with_trunk_and_frozen_batchnorm() -> None:
    model = create_model("avsl_resnet10", embed_dim=E, topk=4)
    assert isinstance(model, AVSL) and isinstance(model.trunk, ResNetTrunk)
    model.train()
    bns = [m for m in model.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    before = model.similarity.links.clone()
    feats = model(torch.randn(2, 3, 64, 64))
    assert [e.shape for e in feats.embeddings] == [(2, E)] * 3
    assert feats.links is not None and not torch.equal(model.similarity.links, before)
    model.eval()
    assert model(torch.randn(2, 3, 64, 64)).links is None
    with pytest.raises(ValueError, match=r"certainties need at least 2 positions"):
        model(torch.randn(1, 3, 32, 32))  # layer4 would be 1x1


def test_pairwise_knn_matches_the_full_matrix() -> None:
    model = AVSL(None, in_channels=(4, 4, 4), embed_dim=E, topk=5).eval()
    _trained_like(model)
    feats = _features(37)
    full = -model.distance(feats, feats)
    full.fill_diagonal_(float("-inf"))
    expected = full.topk(6, dim=1)
    for block in (1, 5, 64):
        found = pairwise_knn(AVSLScorer(model, feats), 6, exclude_self=True, query_block_size=block)
        assert torch.equal(found.indices, expected.indices)
        torch.testing.assert_close(found.scores, expected.values, rtol=1e-5, atol=1e-6)
    plain = pairwise_knn(AVSLScorer(model, feats, feats), 6, exclude_self=True, gallery_block_size=7)
    assert torch.equal(plain.indices, expected.indices)
    everything = torch.arange(37).expand(37, 37)
    rescored = pairwise_knn(AVSLScorer(model, feats), 6, exclude_self=True, candidates=everything)
    assert torch.equal(rescored.indices, expected.indices)
    # a short shortlist pads with -1
    padded = pairwise_knn(AVSLScorer(model, feats), 4, candidates=torch.full((37, 2), -1))
    assert bool((padded.indices == -1).all()) and bool(torch.isinf(padded.scores).all())


def test_shortlist_excludes_the_query_itself() -> None:
    model = AVSL(None, in_channels=(4, 4, 4), embed_dim=E)
    scorer = AVSLScorer(model, _features(20))
    ids = scorer.shortlist(5)
    assert ids.shape == (20, 5) and not bool((ids == torch.arange(20)[:, None]).any())


def test_evaluator_from_scorer_equals_evaluating_the_full_ranking() -> None:
    model = AVSL(None, in_channels=(4, 4, 4), embed_dim=E, topk=5).eval()
    _trained_like(model)
    feats = _features(40, 3)
    labels = torch.arange(40) % 6
    metrics = ["recall@1", "recall@4", "map@r", "map", "r_precision"]
    evaluator = RetrievalEvaluator(metrics)
    got = evaluator.from_scorer(AVSLScorer(model, feats), labels)
    full = -model.distance(feats, feats)
    full.fill_diagonal_(float("-inf"))
    ranking = full.topk(39, dim=1).indices
    expected = evaluator.from_ranking(ranking, labels)
    for name in metrics:
        assert got[name] == pytest.approx(expected[name], abs=1e-9), name
    # query vs gallery
    queries = feats.rows(slice(0, 10))
    qg = evaluator.from_scorer(AVSLScorer(model, queries, feats), labels[:10], labels)
    assert qg["recall@1"] == 1.0  # every query finds itself at distance 0
    with pytest.raises(ValueError, match="cluster embeddings"):
        RetrievalEvaluator(["nmi"]).from_scorer(AVSLScorer(model, feats), labels)
    with pytest.raises(ValueError, match="query_labels"):
        evaluator.from_scorer(AVSLScorer(model, feats), labels[:5])
    with pytest.raises(ValueError, match="gallery_labels is required"):
        evaluator.from_scorer(AVSLScorer(model, queries, feats), labels[:10])


def test_scorer_input_checks() -> None:
    model = AVSL(None, in_channels=(4, 4, 4), embed_dim=E)
    with pytest.raises(ValueError, match=r"queries level 1: embeddings and certainties must be \(5, 16\)"):
        bad = _features(5)
        AVSLScorer(
            model,
            AVSLFeatures(bad.embeddings, (bad.certainties[0], bad.certainties[1][:, :3], bad.certainties[2])),
        )
    with pytest.raises(ValueError, match="must have 3 levels"):
        AVSLScorer(model, _features(5, levels=2))
    scorer = AVSLScorer(model, _features(5), _features(6))
    with pytest.raises(ValueError, match="exclude_self needs as many queries as gallery items"):
        pairwise_knn(scorer, 2, exclude_self=True)
    with pytest.raises(ValueError, match=r"candidates must be a \(5, S\) tensor"):
        pairwise_knn(scorer, 2, candidates=torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"candidates hold ids outside \[-1, 6\)"):
        pairwise_knn(scorer, 2, candidates=torch.full((5, 3), 6))
    with pytest.raises(ValueError, match="k=7 exceeds the 6 gallery items"):
        pairwise_knn(scorer, 7)
    with pytest.raises(ValueError, match=r"gallery_ids must lie in \[0, 6\), got min -1"):
        scorer.score_pairs(torch.tensor([0]), torch.tensor([-1]))  # not "the last gallery item"
    with pytest.raises(TypeError, match="query_ids must be a 1-D integer tensor"):
        scorer.score_pairs(torch.tensor([0.0]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"feature map 1 must be \(B, 4, H, W\)"):
        model.forward_features([torch.rand(1, 4, 4, 4), torch.rand(1, 5, 4, 4), torch.rand(1, 4, 2, 2)])


def test_proxy_anchor_loss_trains_and_checks_labels() -> None:
    torch.manual_seed(0)
    model = AVSL(None, in_channels=(4, 4, 4), embed_dim=E, topk=5)
    loss_fn = AVSLProxyAnchorLoss(num_classes=3, embed_dim=E, level_weights=(0.5, 1.0, 0.5))
    maps = [torch.rand(9, 4, 4, 4), torch.rand(9, 4, 2, 2), torch.rand(9, 4, 2, 2)]
    labels = torch.arange(9) % 3
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-2)
    values = []
    for _ in range(30):
        out = loss_fn(model, model.forward_features(maps), labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        values.append(out.loss.item())
    assert values[-1] < 0.7 * values[0]
    expected_total = out.final + 0.5 * out.levels[0] + out.levels[1] + 0.5 * out.levels[2]
    torch.testing.assert_close(out.loss, expected_total)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\)"):
        loss_fn(model, model.forward_features(maps), labels + 1)
    with pytest.raises(ValueError, match="level_weights needs 3 entries"):
        AVSLProxyAnchorLoss(3, E, level_weights=(1.0, 1.0))
    # beyond max_all_proxies, only the batch's classes are compared
    few = AVSLProxyAnchorLoss(num_classes=50, embed_dim=E, max_all_proxies=10)
    matrices, cols = few.distances(model, model.forward_features(maps), labels * 7)
    assert cols.tolist() == [0, 7, 14] and matrices.final.shape == (9, 3)


def test_margin_and_pairwise_losses() -> None:
    torch.manual_seed(0)
    model = AVSL(None, in_channels=(4, 4, 4), embed_dim=E, topk=5)
    maps = [torch.rand(8, 4, 4, 4), torch.rand(8, 4, 2, 2), torch.rand(8, 4, 2, 2)]
    labels = torch.arange(8) % 4
    margin = AVSLMarginLoss(num_classes=4, generator=torch.Generator().manual_seed(0))
    out = margin(model, model.forward_features(maps), labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and margin.beta.grad is not None
    assert model.embedder.projections[0].weight.grad is not None
    # far-apart classes and a large margin: nothing is active, the loss is 0 rather than 0 / 0
    calm = AVSLMarginLoss(num_classes=4, margin=-10.0)
    assert calm(model, model.forward_features(maps), labels).loss.item() == 0.0
    pairwise = AVSLPairwiseProxyAnchorLoss()
    assert torch.isfinite(pairwise(model, model.forward_features(maps), labels).loss)


def write_official_run(model: AVSL, root: Path) -> None:
    """Write ``model`` as the official code saves a run (three state dicts, the official key names); the docs
    tests use it too."""
    state, e = model.state_dict(), model.embed_dim
    trunk = {f"model.{k[len('trunk.') :]}": v for k, v in state.items() if k.startswith("trunk.")}
    assert model.trunk is not None
    trunk.update(
        {"model.fc.weight": torch.zeros(1000, model.trunk.num_features), "model.fc.bias": torch.zeros(1000)}
    )
    embedder = {}
    for lv in range(3):
        embedder[f"conv1x1_{lv}.weight"] = state[f"embedder.projections.{lv}.weight"]
        embedder[f"conv1x1_{lv}.bias"] = state[f"embedder.projections.{lv}.bias"]
    collector = {"prob_coef_0": torch.ones(e), "prob_bias_0": torch.zeros(e), "proxy_0": torch.zeros(5, e)}
    for lv in (1, 2):
        collector[f"prob_coef_{lv}"] = state["similarity.reliability_scale"][lv - 1]
        collector[f"prob_bias_{lv}"] = state["similarity.reliability_bias"][lv - 1]
        collector[f"link_{lv - 1}to{lv}"] = state["similarity.links"][lv - 1]
    for stem, section in (
        ("models_trunk", trunk),
        ("models_embedder", embedder),
        ("collectors_collector", collector),
    ):
        torch.save(section, root / f"{stem}_best.ckpt")


def test_official_run_directory_loads(tmp_path: Path) -> None:
    source = create_model("avsl_resnet10", embed_dim=E, topk=4)
    _trained_like(source, seed=5)
    write_official_run(source, tmp_path)
    loaded = create_model("avsl_resnet10", checkpoint=read_official_avsl(tmp_path), embed_dim=E, topk=4)
    images = torch.randn(3, 3, 64, 64)
    source.eval(), loaded.eval()
    with torch.no_grad():
        a, b = source(images), loaded(images)
        torch.testing.assert_close(source.distance(a, a), loaded.distance(b, b))
    assert int(loaded.similarity.num_link_updates) == 1  # trained links: the next batch is averaged in
    (tmp_path / "models_embedder_best.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match=r"models_embedder_best\.ckpt"):
        read_official_avsl(tmp_path)


def test_explanation_is_consistent_and_drawn(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from objretrieval.visualization import draw_avsl_explanation

    model = create_model("avsl_resnet10", embed_dim=E, topk=4)
    _trained_like(model)
    a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    explanation = model.explain(a, b)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        distances = model.distance(model(a), model(b)).diagonal()
    torch.testing.assert_close(explanation.distance, distances, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(explanation.propagated[-1].sum(-1), explanation.distance)
    assert [m.shape for m in explanation.activation_maps_a] == [(2, E, 8, 8), (2, E, 4, 4), (2, E, 2, 2)]
    nodes = explanation.top_nodes(1, 3)
    assert bool((explanation.propagated[-1][1, nodes] <= explanation.propagated[-1][1].median()).all())
    support = explanation.supporting_nodes(int(nodes[0]), k=2)
    column = explanation.propagation_weights[-1][:, int(nodes[0])]
    assert set(support.tolist()) == set(column.topk(2).indices.tolist())
    path = tmp_path / "explanation.png"
    draw_avsl_explanation(explanation, a[1], b[1], pair=1, num_nodes=2, path=path)
    assert path.is_file() and path.stat().st_size > 5_000
    with pytest.raises(ValueError, match="images_a and images_b must have the same shape"):
        model.explain(a, b[:1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scoring_matches_cpu() -> None:
    model = AVSL(None, in_channels=(4, 4, 4), embed_dim=64, topk=8).eval()
    _trained_like(model)
    feats = _features(300, dim=64)
    cpu = pairwise_knn(AVSLScorer(model, feats), 10, exclude_self=True)
    gpu = pairwise_knn(AVSLScorer(model.cuda(), feats.to("cuda")), 10, exclude_self=True)
    assert torch.equal(gpu.indices.cpu(), cpu.indices)
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, rtol=1e-4, atol=1e-5)


def test_pairwise_knn_refuses_nan_from_a_block_scorer() -> None:
    from objretrieval.search import pairwise_knn

    class NaNBlocks:
        num_queries = num_gallery = 4
        device = torch.device("cpu")
        symmetric = False

        def score_pairs(self, query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(query_ids))

        def score_block(self, query_rows: slice, gallery_rows: slice) -> torch.Tensor:
            s = torch.zeros(4, 4)[query_rows, gallery_rows].clone()
            s[0, 1] = float("nan")
            return s

    with pytest.raises(ValueError, match="NaN or inf"):
        pairwise_knn(NaNBlocks(), 2)
