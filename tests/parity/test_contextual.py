"""Parity with the official contextual-similarity code (Liao et al., ICML 2023): evaluation protocols.

Everything (files, which tensors are expected outputs, the K values they encode, tolerances) is read from the
fixture manifest, so the same tests run on any fixture set of this format.
"""

from __future__ import annotations

import pytest

from objretrieval.metrics import RetrievalEvaluator
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
