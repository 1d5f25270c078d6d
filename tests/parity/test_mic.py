"""Parity with the official MIC code (Roth et al., ICCV 2019): evaluation, losses, sampling, checkpoint layout.

Tensor names, configuration and tolerances come from the fixture manifest.
"""

from __future__ import annotations

import faiss
import pytest
import torch
from scipy.stats import chi2

from objretrieval import create_model
from objretrieval.losses import AdversarialDecorrelationLoss, MarginLoss
from objretrieval.metrics import RetrievalEvaluator, kmeans, normalized_mutual_info, pairwise_f1
from objretrieval.miners import DistanceWeightedMiner, MinedTriplets
from objretrieval.models import MIC
from objretrieval.training import MICTraining
from tests.parity.fixtures import (
    MethodFixtures,
    assert_close,
    key_listing_files,
    method_fixtures,
    parse_tolerance,
    random_state,
)

EVAL_FILE = "eval_metrics.safetensors"
# (tensor-name prefix, protocol): the single-set protocol and the query/gallery (In-Shop) one.
PROTOCOLS = [("", "single"), ("qg_", "query_gallery")]


@pytest.fixture(scope="module")
def mic() -> MethodFixtures:
    return method_fixtures("mic")


def _spec(mic: MethodFixtures) -> dict:
    return mic.manifest["fixtures"][EVAL_FILE]


def _tolerance(spec: dict, prefix: str) -> tuple[float, float]:
    key = next(k for k in spec["tolerance"] if k.startswith(prefix))
    return parse_tolerance(spec["tolerance"][key])


def _inputs(t: dict, prefix: str) -> tuple:
    """(embeddings, labels, cluster labels, query/gallery args) for one protocol."""
    if prefix == "":
        return t["embeddings"], t["labels"], t["labels"], ()
    q, ql = t[f"{prefix}query_embeddings"], t[f"{prefix}query_labels"]
    g, gl = t[f"{prefix}gallery_embeddings"], t[f"{prefix}gallery_labels"]
    return q, ql, torch.cat([ql, gl]), (g, gl)


@pytest.mark.parametrize(("prefix", "protocol"), PROTOCOLS)
def test_recall_at_k(mic: MethodFixtures, prefix: str, protocol: str) -> None:
    spec = _spec(mic)
    t = mic.tensors(EVAL_FILE)
    ks = t[f"{prefix}k_vals"].tolist()
    queries, labels, _, gallery = _inputs(t, prefix)
    result = RetrievalEvaluator([f"recall@{k}" for k in ks], metric="l2")(queries, labels, *gallery)
    assert_close(
        [result[f"recall@{k}"] for k in ks],
        t[f"{prefix}recall_at_k"],
        _tolerance(spec, "recall"),
        f"{protocol} recall@{ks}",
    )


@pytest.mark.parametrize(("prefix", "protocol"), PROTOCOLS)
def test_nmi_and_f1_from_the_official_clustering(mic: MethodFixtures, prefix: str, protocol: str) -> None:
    spec = _spec(mic)
    t = mic.tensors(EVAL_FILE)
    tolerance = _tolerance(spec, "nmi/f1")
    _, _, cluster_labels, _ = _inputs(t, prefix)
    assignment = t[f"{prefix}kmeans_assignment"]
    assert_close(
        normalized_mutual_info(assignment, cluster_labels, "arithmetic"),
        t[f"{prefix}nmi_arithmetic"],
        tolerance,
        f"{protocol} NMI (arithmetic)",
    )
    assert_close(
        normalized_mutual_info(assignment, cluster_labels, "geometric"),
        t[f"{prefix}nmi_geometric"],
        tolerance,
        f"{protocol} NMI (geometric)",
    )
    assert_close(pairwise_f1(assignment, cluster_labels), t[f"{prefix}f1"], tolerance, f"{protocol} F1")


@pytest.mark.parametrize(("prefix", "protocol"), PROTOCOLS)
def test_kmeans_end_to_end(mic: MethodFixtures, prefix: str, protocol: str) -> None:
    """Our k-means gives the official assignment on the same faiss version, else close NMI/F1."""
    spec = _spec(mic)
    t = mic.tensors(EVAL_FILE)
    queries, labels, _, gallery = _inputs(t, prefix)
    points = torch.cat([queries, gallery[0]]) if gallery else queries
    num_classes = int(torch.unique(labels).numel())
    assignment, _ = kmeans(points, num_classes)
    result = RetrievalEvaluator(["nmi", "nmi_geometric", "f1"], metric="l2")(queries, labels, *gallery)
    same_build = faiss.__version__ == spec["config"]["faiss_version"]
    if same_build:
        assert torch.equal(assignment, t[f"{prefix}kmeans_assignment"]), f"{protocol} k-means assignment"
        tolerance = _tolerance(spec, "nmi/f1")
    else:  # the manifest's fallback tolerance for another faiss build
        tolerance = parse_tolerance(spec["tolerance"]["kmeans_assignment"])
    assert_close(result["nmi"], t[f"{prefix}nmi_arithmetic"], tolerance, f"{protocol} NMI (arithmetic)")
    assert_close(
        result["nmi_geometric"], t[f"{prefix}nmi_geometric"], tolerance, f"{protocol} NMI (geometric)"
    )
    assert_close(result["f1"], t[f"{prefix}f1"], tolerance, f"{protocol} F1")


# --- losses and sampling --------------------------------------------------------------------------------------

MARGIN_FILE = "margin_loss.safetensors"
ADVERSARIAL_FILE = "adversarial_loss.safetensors"


@pytest.mark.parametrize(
    ("normalizer", "suffix"), [("active_terms", ""), ("active_triplets", "_boolor_paircount")]
)
def test_margin_loss(mic: MethodFixtures, normalizer: str, suffix: str) -> None:
    """Both normalisers: the paper's count of active terms, and modern torch's count of active triplets."""
    spec = mic.manifest["fixtures"][MARGIN_FILE]
    t = mic.tensors(MARGIN_FILE)
    tolerance = parse_tolerance(spec["tolerance"])
    config = spec["config"]
    # the fixture's embeddings are already unit vectors and are the leaf the gradient is taken for
    loss = MarginLoss(
        config["n_classes"],
        margin=config["margin(alpha)"],
        beta=config["beta_init_default"],
        nu=config["nu"],
        normalizer=normalizer,
        normalize_embeddings=False,
    )
    loss.beta.data.copy_(t["beta"])
    x = t["embeddings"].clone().requires_grad_(True)
    triplets = MinedTriplets(*t["triplets"].T)
    value = loss(x, t["labels"], triplets)
    value.backward()
    assert_close(value, t[f"loss{suffix}"], tolerance, f"margin loss ({normalizer})")
    assert_close(x.grad, t[f"grad_embeddings{suffix}"], tolerance, f"d loss / d embeddings ({normalizer})")
    assert_close(loss.beta.grad, t[f"grad_beta{suffix}"], tolerance, f"d loss / d beta ({normalizer})")


def test_distance_weighted_sampling_probabilities(mic: MethodFixtures) -> None:
    spec = mic.manifest["fixtures"][MARGIN_FILE]
    t = mic.tensors(MARGIN_FILE)
    tolerance = parse_tolerance(spec["tolerance"])
    assert not spec["config"]["upper_cutoff_applied"]
    miner = DistanceWeightedMiner(cutoff=spec["config"]["lower_cutoff"])
    x, y = t["embeddings"], t["labels"]
    assert_close(miner.distances(x, x), t["pair_distances_clamped"], tolerance, "clamped distances")
    assert_close(
        miner.negative_probabilities(x, y, x, y), t["neg_sampling_probs"], tolerance, "probabilities"
    )


def test_distance_weighted_sampling_distribution(mic: MethodFixtures) -> None:
    """Chi-square goodness of fit of the miner's drawn negatives against the official probabilities."""
    t = mic.tensors(MARGIN_FILE)
    spec = mic.manifest["fixtures"][MARGIN_FILE]
    expected = t["neg_sampling_probs"].double()
    draws = 3000
    miner = DistanceWeightedMiner(
        cutoff=spec["config"]["lower_cutoff"],
        triplets_per_anchor=draws,
        generator=torch.Generator().manual_seed(0),
    )
    anchors, positives, negatives = miner(t["embeddings"], t["labels"])
    y = t["labels"]
    assert bool((y[anchors] == y[positives]).all() and (anchors != positives).all())
    assert bool((y[anchors] != y[negatives]).all())
    counts = torch.zeros_like(expected)
    counts.index_put_((anchors, negatives), torch.ones(len(anchors), dtype=torch.float64), accumulate=True)
    support = expected > 0
    statistic = ((counts - draws * expected).pow(2) / (draws * expected).clamp(min=1e-12))[support].sum()
    dof = int(support.sum()) - expected.shape[0]
    p_value = chi2.sf(float(statistic), dof)
    assert p_value > 1e-3, f"negatives do not follow the distance-weighted distribution (p = {p_value:.2e})"


def test_adversarial_loss(mic: MethodFixtures) -> None:
    spec = mic.manifest["fixtures"][ADVERSARIAL_FILE]
    t = mic.tensors(ADVERSARIAL_FILE)
    tolerance = parse_tolerance(spec["tolerance"])
    config = spec["config"]
    loss = AdversarialDecorrelationLoss(config["class_dim"], config["aux_dim"], proj_dim=config["proj_dim"])
    prefix = "regressor_state."
    loss.load_state_dict({k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}, strict=True)
    c = t["class_features"].clone().requires_grad_(True)
    s = t["aux_features"].clone().requires_grad_(True)
    value = loss(c, s)
    value.backward()
    assert_close(value, t["loss"], tolerance, "adversarial loss")
    assert_close(c.grad, t["grad_class_features"], tolerance, "reversed gradient of the class features")
    assert_close(s.grad, t["grad_aux_features"], tolerance, "reversed gradient of the shared features")
    for name, param in loss.named_parameters():
        assert_close(param.grad, t[f"grad_param.{name}"], tolerance, f"gradient of {name}")


@pytest.mark.parametrize("listing_file", key_listing_files("mic"))
def test_default_checkpoint_layout_loads_strictly(mic: MethodFixtures, listing_file: str) -> None:
    """The official default state dict (with its layer_blocks.* aliases) and the loss modules load strictly."""
    listing = mic.json(listing_file)
    network = next(v for k, v in listing.items() if k.startswith("network"))
    criteria = next(v for k, v in listing.items() if k.startswith("criterion"))
    state = random_state(network)
    for key in state:  # the aliases are the very tensors of model.layer1..4
        if key.startswith("layer_blocks."):
            _, block, rest = key.split(".", 2)
            state[key] = state[f"model.layer{int(block) + 1}.{rest}"]
    class_dim, shared_dim = (network[f"model.last_linear.{t}.weight"][0][0] for t in ("Class", "Shared"))
    model = create_model(
        "mic_resnet50", checkpoint={"state_dict": state}, class_dim=class_dim, shared_dim=shared_dim
    )
    assert isinstance(model, MIC)
    assert torch.equal(model.class_head.weight, state["model.last_linear.Class.weight"])
    assert torch.equal(model.shared_head.bias, state["model.last_linear.Shared.bias"])
    assert torch.equal(model.trunk.layer4[2].conv3.weight, state["model.layer4.2.conv3.weight"])
    assert torch.equal(model.trunk.bn1.running_var, state["model.bn1.running_var"])

    criteria_state = random_state(criteria)
    num_classes, num_clusters = (criteria[f"{t}.beta"][0][0] for t in ("Class", "Shared"))
    projection_dim = next(s[0][0] for k, s in criteria.items() if k.endswith("regressor.0.weight"))
    training = MICTraining(model, num_classes, num_clusters, projection_dim=projection_dim)
    training.load_official_criteria(criteria_state)
    assert torch.equal(training.shared_loss.beta, criteria_state["Shared.beta"])
    regressor = next(k for k in criteria_state if k.endswith("regressor.2.weight"))
    assert torch.equal(training.adversarial.regressor[2].weight, criteria_state[regressor])
