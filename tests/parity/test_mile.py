"""Parity with the official MILE code (WACV 2025): AR@K with the per-rank best-query rule.

Input/output files, k_max and tolerances come from the fixture manifest.
"""

from __future__ import annotations

import pytest

from objretrieval.metrics import RetrievalEvaluator, average_recall_at_k
from objretrieval.search import knn
from tests.parity.fixtures import (
    MethodFixtures,
    assert_close,
    fixtures_of_kind,
    method_fixtures,
    parse_tolerance,
)


@pytest.fixture(scope="module")
def mile() -> MethodFixtures:
    return method_fixtures("mile")


@pytest.mark.parametrize("name", fixtures_of_kind("mile", "metric"))
def test_average_recall_at_k(mile: MethodFixtures, name: str) -> None:
    spec = mile.manifest["fixtures"][name]
    inputs = mile.tensors(spec["files"]["inputs"])
    expected = mile.tensors(spec["files"]["outputs"])
    k = spec["config"]["k_max"]
    tolerance = parse_tolerance(spec["tolerance"])
    # MILE ranks by raw inner product of un-normalised set embeddings.
    scores, indices = knn(inputs["query_embeddings"], inputs["gallery_embeddings"], k=k, metric="ip")
    result = average_recall_at_k(scores, indices, inputs["query_labels"], inputs["gallery_labels"])
    assert_close(result.recalls, expected["recalls"], tolerance, f"{name} recalls")
    assert_close(result.mean, expected["mean_recall"], tolerance, f"{name} AR@{k}")

    evaluated = RetrievalEvaluator([f"ar@{k}"], metric="ip")(
        inputs["query_embeddings"],
        inputs["query_labels"],
        inputs["gallery_embeddings"],
        inputs["gallery_labels"],
    )
    assert_close(evaluated[f"ar@{k}"], expected["mean_recall"], tolerance, f"{name} evaluator AR@{k}")
