"""Parity with the official contextual-similarity code (Liao et al., ICML 2023): evaluation, losses, samplers.

Everything (files, which tensors are expected outputs, the K values they encode, tolerances) is read from the
fixture manifest, so the same tests run on any fixture set of this format.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pytest
import torch

from objretrieval.losses import (
    ContextualLoss,
    ContrastiveLoss,
    MetricLoss,
    MultiSimilarityLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    ROADMAPLoss,
    SmoothAPLoss,
    TripletMarginLoss,
    contextual_similarity,
    ranking_average_precision,
)
from objretrieval.metrics import RetrievalEvaluator
from objretrieval.miners import MinedTriplets, MultiSimilarityMiner
from objretrieval.samplers import HierarchicalSampler, MPerClassSampler
from tests.parity.fixtures import (
    MethodFixtures,
    assert_close,
    fixture_root,
    ks_in_name,
    method_fixtures,
    parse_tolerance,
)

RECALL_PREFIX = "expected_recall_at_"


def _eval_fixture_names(checked: str) -> list[str]:
    """Evaluation fixtures whose manifest gives a tolerance for ``checked`` (i.e. that pin that metric)."""
    if not fixture_root().is_dir():
        return []
    fixtures = MethodFixtures("contextual").manifest["sections"]["eval"]["fixtures"]
    return [name for name, spec in fixtures.items() if checked in spec["tolerance"]]


@pytest.fixture(scope="module")
def contextual() -> MethodFixtures:
    return method_fixtures("contextual")


def _evaluate(tensors: dict, metrics: list[str], **kwargs):
    evaluator = RetrievalEvaluator(metrics, metric="cosine", **kwargs)
    if "x" in tensors:  # one set, every sample queries all the others
        return evaluator(tensors["x"], tensors["labels"])
    return evaluator(
        tensors["query_x"], tensors["query_labels"], tensors["gallery_x"], tensors["gallery_labels"]
    )


@pytest.mark.parametrize("name", _eval_fixture_names("recall"))
def test_recall_at_k(contextual: MethodFixtures, name: str) -> None:
    spec = contextual.manifest["sections"]["eval"]["fixtures"][name]
    tensors = contextual.tensors(spec["file"])
    tolerance = parse_tolerance(spec["tolerance"]["recall"])
    recall_names = [n for n in tensors if n.startswith(RECALL_PREFIX)]
    assert recall_names, f"{name} has no {RECALL_PREFIX}* tensors"
    for tensor_name in recall_names:
        ks = ks_in_name(tensor_name, RECALL_PREFIX)
        scale = 100.0 if "percent" in tensor_name else 1.0
        result = _evaluate(tensors, [f"recall@{k}" for k in ks])
        assert_close(
            [scale * result[f"recall@{k}"] for k in ks], tensors[tensor_name], tolerance, tensor_name
        )


@pytest.mark.parametrize("name", _eval_fixture_names("mAP"))
def test_average_precision(contextual: MethodFixtures, name: str) -> None:
    spec = contextual.manifest["sections"]["eval"]["fixtures"][name]
    tensors = contextual.tensors(spec["file"])
    tolerance = parse_tolerance(spec["tolerance"]["mAP"])
    result = _evaluate(tensors, ["map", "map@r"], return_per_query=True)
    assert_close(result["map"], tensors["expected_mAP"], tolerance, "mAP")
    assert_close(result["map@r"], tensors["expected_mAP_at_R"], tolerance, "MAP@R")
    assert_close(result.per_query["map"], tensors["expected_AP_per_query"], tolerance, "AP per query")
    assert_close(
        result.per_query["map@r"], tensors["expected_AP_at_R_per_query"], tolerance, "AP@R per query"
    )


# --- losses ---------------------------------------------------------------------------------------------------


def _loss_fixture_names() -> list[str]:
    if not fixture_root().is_dir():
        return []
    return list(MethodFixtures("contextual").manifest["sections"]["losses"]["fixtures"])


def _official_loss(name: str, config: dict, tensors: dict) -> tuple[MetricLoss, object]:
    """Our loss configured as the official function that produced fixture ``name``, and its indices_tuple.

    Which official function made each fixture is recorded in the manifest's ``produced_by``; the settings
    come from its ``config``. SmoothAP/ROADMAP run with ``rank_query_itself=True``, the reference code's
    ranking (our default leaves the query out of its own list, as AP is defined).
    """
    c = config
    if name == "contextual_loss":
        return ContextualLoss(
            k=c["k"], eps=c["eps"], context_weight=1, contrastive_weight=0, reg_weight=0
        ), None
    if name == "hybrid_224":  # lam weights the contrastive term; the regulariser is added on top
        return ContextualLoss(
            k=c["k"],
            eps=c["eps"],
            context_weight=1 - c["lam"],
            contrastive_weight=c["lam"],
            reg_weight=c["gamma"],
            reg_target=c["regsim"],
            pos_margin=c["pos_margin"],
            neg_margin=c["neg_margin"],
        ), None
    if name == "hybrid_256":  # lam weights the contextual term; convex mix with the regulariser
        return ContextualLoss(
            k=c["k"],
            eps=c["eps"],
            context_weight=c["lam"],
            contrastive_weight=1 - c["lam"] - c["gamma"],
            reg_weight=c["gamma"],
            reg_target=c["reg_sim"],
            pos_margin=c["pos_margins"],
            neg_margin=c["neg_margins"],
        ), None
    if name == "contrastive":
        return ContrastiveLoss(c["pos_margin"], c["neg_margin"]), None
    if name == "roadmap":
        sup = {k: c["supap"][k] for k in ("tau", "rho", "offset", "delta", "start")}
        return ROADMAPLoss(
            lam=c["lam"],
            pos_margin=c["pos_margin"],
            neg_margin=c["neg_margin"],
            rank_query_itself=True,
            **sup,
        ), None
    if name == "smoothap":
        return SmoothAPLoss(tau=c["tau"], rank_query_itself=True), None
    if name in ("ms_miner", "ms_no_miner"):
        loss = MultiSimilarityLoss(c["alpha"], c["beta"], c["base"])
        return loss, (MultiSimilarityMiner(c["miner_epsilon"]) if "miner_epsilon" in c else None)
    if name == "proxy_anchor":
        loss = ProxyAnchorLoss(
            c["nb_classes"], tensors["proxies"].shape[1], margin=c["mrg"], alpha=c["alpha"]
        )
        return loss, None
    if name == "proxy_nca":
        return ProxyNCALoss(
            c["num_classes"], tensors["proxies"].shape[1], softmax_scale=c["softmax_scale"]
        ), None
    if name == "triplet":
        return TripletMarginLoss(margin=c["margin"]), MinedTriplets(
            tensors["anchor_idx"], tensors["positive_idx"], tensors["negative_idx"]
        )
    raise AssertionError(f"no objretrieval loss is mapped to fixture {name!r}")


def _component(loss: MetricLoss, batch, expected_name: str, config: dict):
    """Our value of a side output the fixture records (``expected_loss_<term>`` and friends)."""
    if expected_name == "expected_contextual_similarity":
        return contextual_similarity(batch.similarity, config["k"], config["eps"])
    if expected_name == "expected_loss_smoothap":
        return SmoothAPLoss(tau=config["smoothap"]["tau"], rank_query_itself=True).compute_loss(batch)
    if expected_name == "expected_one_minus_exact_batch_ap":
        ap = ranking_average_precision(
            batch.similarity, batch.same_label, rank="exact", rank_query_itself=True
        )
        return 1 - ap.mean()
    term = expected_name.removeprefix("expected_loss_")
    return loss.compute_parts(batch)[term]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", _loss_fixture_names())
def test_loss_values_and_gradients(contextual: MethodFixtures, name: str, dtype: torch.dtype) -> None:
    spec = contextual.manifest["sections"]["losses"]["fixtures"][name]
    tensors = contextual.tensors(spec["file"])
    tolerance = parse_tolerance(
        spec["tolerance"]["float64_impl" if dtype == torch.float64 else "float32_impl"]
    )
    for input_name, meta in spec["inputs"].items():
        assert list(tensors[input_name].shape) == meta["shape"], input_name
    loss, mined = _official_loss(name, spec["config"], tensors)
    loss = loss.to(dtype)
    if "proxies" in spec["inputs"]:
        loss.proxies.data.copy_(tensors["proxies"])
    x = tensors["x"].to(dtype).requires_grad_(True)
    labels = tensors["labels"]
    indices = mined(x, labels) if isinstance(mined, torch.nn.Module) else mined
    value = loss(x, labels, indices)
    value.backward()
    outputs = spec["expected_outputs"]
    assert_close(value, tensors["expected_loss"], tolerance, f"{name} loss")
    assert_close(x.grad, tensors["expected_grad_x"], tolerance, f"{name} d loss / d x")
    if "expected_grad_proxies" in outputs:
        assert_close(
            loss.proxies.grad, tensors["expected_grad_proxies"], tolerance, f"{name} d loss / d proxies"
        )
    with torch.no_grad():
        batch = loss.prepare_batch(x, labels)
        for expected_name in outputs:
            if expected_name in ("expected_loss", "expected_grad_x", "expected_grad_proxies"):
                continue
            assert_close(
                _component(loss, batch, expected_name, spec["config"]),
                tensors[expected_name],
                tolerance,
                f"{name} {expected_name}",
            )


# --- samplers -------------------------------------------------------------------------------------------------
#
# Batch-composition invariants of our samplers on the contextual-similarity sampler fixtures.
#
# The official samplers draw from the legacy global numpy generator, so their exact index sequences cannot be
# reproduced by our samplers (which use a local generator), and our epochs are longer by design (every sample is
# covered). What is checked, per sampler fixture of the manifest, are the invariants the manifest lists about
# how a batch is composed, on the fixture's own labels and with the fixture's batch size and per-class count:
#
# * MPerClassSampler (``BalancedSampler`` / ``RandomSampler`` fixtures): ``batch_size / m`` distinct classes per
#   batch, each with exactly ``m`` contiguous indices, distinct unless the class has fewer than ``m`` images;
# * HierarchicalSampler (``HierarchicalSamplerBalanced`` fixtures): two halves of ``batch_size / 2`` indices,
#   each from ONE super-label, the two from DIFFERENT super-labels, each made of ``(batch_size / 2) / m`` class
#   groups of ``m`` contiguous indices.
#
# The same checks are run on the official batches stored in the fixture, which shows the checks encode the
# manifest's invariants (and not something only our samplers do).

SECTION = "samplers"
PER_CLASS_KEYS = ("images_per_class", "samples_per_class")
EPOCHS = (0, 1)


def _sampler_fixture_names() -> list[str]:
    if not fixture_root().is_dir():
        return []
    return list(MethodFixtures("contextual").manifest["sections"][SECTION]["fixtures"])


def _sampler_spec(contextual: MethodFixtures, name: str) -> dict[str, Any]:
    return contextual.manifest["sections"][SECTION]["fixtures"][name]


def _is_hierarchical(spec: dict[str, Any]) -> bool:
    """The official sampler a fixture comes from, as its manifest names it."""
    return "Hierarchical" in spec["produced_by"]


def _per_class(config: dict[str, Any]) -> int:
    found = [config[key] for key in PER_CLASS_KEYS if key in config]
    assert len(found) == 1, f"config must give exactly one of {PER_CLASS_KEYS}, got {sorted(config)}"
    return int(found[0])


def _composition_errors(
    batch: np.ndarray,
    labels: np.ndarray,
    super_labels: np.ndarray | None,
    batch_size: int,
    m: int,
    distinct_classes_per_part: bool,
) -> list[str]:
    """Ways in which one batch breaks the manifest's composition invariants (empty when it satisfies them)."""
    errors = []
    if batch.size != batch_size:
        return [f"{batch.size} indices instead of {batch_size}"]
    parts = np.split(batch, 2) if super_labels is not None else [batch]
    for part in parts:
        groups = part.reshape(-1, m)  # consecutive runs of m indices
        classes = labels[groups]
        if (classes != classes[:, :1]).any():
            errors.append(f"a run of {m} indices mixes classes: {classes.tolist()}")
            continue
        if distinct_classes_per_part and np.unique(classes[:, 0]).size != groups.shape[0]:
            errors.append(f"a class appears in two groups: {classes[:, 0].tolist()}")
        sizes = np.count_nonzero(labels[None, :] == classes[:, :1], axis=1)
        repeats = np.array([np.unique(g).size < m for g in groups])
        if (repeats & (sizes >= m)).any():
            errors.append(f"indices repeat within a group of a class with >= {m} images: {groups.tolist()}")
    if super_labels is not None:
        half_supers = [np.unique(super_labels[part]) for part in parts]
        if any(s.size != 1 for s in half_supers):
            errors.append(f"a half mixes super-labels {[s.tolist() for s in half_supers]}")
        elif half_supers[0][0] == half_supers[1][0]:
            errors.append(f"both halves come from super-label {half_supers[0][0]}")
    return errors


def _official_batches(tensors: dict[str, Any], spec: dict[str, Any]) -> list[np.ndarray]:
    names = [n for n in tensors if n.startswith("expected_batches")]
    assert names, f"{spec['file']} stores no expected_batches* tensor"
    return [tensors[n].numpy() for n in names]


@pytest.mark.parametrize("name", _sampler_fixture_names())
def test_sampler_batch_composition(contextual: MethodFixtures, name: str) -> None:
    spec = _sampler_spec(contextual, name)
    config = spec["config"]
    tensors = contextual.tensors(spec["file"])
    assert "labels" in tensors, f"{spec['file']} has no labels tensor (has {sorted(tensors)})"
    labels = tensors["labels"].numpy()
    hierarchical = _is_hierarchical(spec)
    super_labels = None
    if hierarchical:
        assert "super_labels" in tensors, f"{name} comes from a hierarchical sampler but has no super_labels"
        super_labels = tensors["super_labels"].numpy()
    batch_size, m = int(config["batch_size"]), _per_class(config)

    # fixture sanity: the sizes the manifest states are those of the stored labels
    if "num_samples" in config:
        assert labels.size == config["num_samples"]
    if "num_classes" in config:
        assert np.unique(labels).size == config["num_classes"]
    if "classes_per_super" in config:
        assert super_labels is not None
        per_super = [np.unique(labels[super_labels == s]).size for s in np.unique(super_labels)]
        assert per_super == config["classes_per_super"]

    # The official samplers draw classes with fewer than m images with replacement (safe_random_choice; the
    # hierarchical fixtures hold such classes). Where the fixture has such classes we do the same with
    # small_classes="replace"; otherwise the default "error" policy applies (no index may repeat in a group).
    _, class_sizes = np.unique(labels, return_counts=True)
    small_classes: Literal["error", "replace"] = "replace" if class_sizes.min() < m else "error"

    # the checks hold for the official batches (validates the checks against the manifest's invariants; the
    # official hierarchical sampler may repeat a class within a half, which the manifest does not exclude)
    for official in _official_batches(tensors, spec):
        for batch in official:
            errors = _composition_errors(batch, labels, super_labels, batch_size, m, not hierarchical)
            assert not errors, f"official batch of {name} fails the check: {errors}"

    if hierarchical:
        sampler: MPerClassSampler | HierarchicalSampler = HierarchicalSampler(
            labels, super_labels, batch_size, m, small_classes=small_classes
        )
    else:
        sampler = MPerClassSampler(labels, batch_size, m, small_classes=small_classes)
    for epoch in EPOCHS:
        sampler.set_epoch(epoch)
        batches = [np.asarray(batch) for batch in sampler]
        assert len(batches) == len(sampler) > 0
        for batch in batches:
            errors = _composition_errors(batch, labels, super_labels, batch_size, m, True)
            assert not errors, f"{name}, epoch {epoch}: {errors}"
        assert np.unique(np.concatenate(batches)).size == labels.size, "every sample appears each epoch"
