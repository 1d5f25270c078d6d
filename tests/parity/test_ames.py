"""Parity with the official AMES code (Suma et al., ECCV 2024): the revisited Oxford/Paris protocol.

Rankings, ground truth, kappas, expected tensors and tolerances are all read from the fixture manifest.
"""

from __future__ import annotations

import re

import pytest

from objretrieval.metrics import mean_average_precision, revisited_map
from tests.parity.fixtures import (
    MethodFixtures,
    assert_close,
    fixtures_of_kind,
    method_fixtures,
    parse_tolerance,
)

PROTOCOL_KEYS = {"E": "easy", "M": "medium", "H": "hard"}
RESULT_FIELDS = {"map": "map", "aps": "ap", "mpk": "mean_precision", "prk": "precision"}


@pytest.fixture(scope="module")
def ames() -> MethodFixtures:
    return method_fixtures("ames")


class RevisitedCase:
    """One revisited_map fixture: its manifest entry, tensors, ground truth, tolerance and rankings."""

    def __init__(self, ames: MethodFixtures, name: str) -> None:
        self.spec = ames.manifest["fixtures"][name]
        self.tensors = ames.tensors(self.spec["files"]["tensors"])
        self.gnd = ames.json(self.spec["files"]["gnd"])
        self.tolerance = parse_tolerance(self.spec["tolerance"])
        # ranks_<r> tensors as (num_queries, depth) rows; the official layout is (db, nq)
        self.rankings = {
            n[len("ranks_") :]: self.tensors[n].T for n in self.spec["tensors"] if n.startswith("ranks_")
        }

    def expected(self, pattern: str) -> list[tuple[re.Match, object]]:
        """(match, tensor) for every manifest tensor whose name matches ``pattern``."""
        matches = [(re.match(pattern, n), self.tensors[n]) for n in self.spec["tensors"]]
        found = [(m, t) for m, t in matches if m is not None]
        assert found, f"no tensors matching {pattern} in the manifest"
        return found


@pytest.mark.parametrize("name", fixtures_of_kind("ames", "revisited_map"))
def test_revisited_protocols(ames: MethodFixtures, name: str) -> None:
    case = RevisitedCase(ames, name)
    spec, gnd, tolerance, rankings = case.spec, case.gnd, case.tolerance, case.rankings
    results = {r: revisited_map(ranking, gnd, kappas=spec["kappas"]) for r, ranking in rankings.items()}
    for m, expected in case.expected(r"^(?P<ranking>\w+?)_(?P<protocol>[EMH])_(?P<field>map|aps|mpk|prk)$"):
        protocol = getattr(results[m["ranking"]], PROTOCOL_KEYS[m["protocol"]])
        assert_close(getattr(protocol, RESULT_FIELDS[m["field"]]), expected, tolerance, m.string)

    for ranking_name, rounded in spec["compute_metrics_rounded_outputs"].items():
        summary = results[ranking_name].summary()
        for key, value in rounded.items():
            if key in summary:
                assert summary[key] == value, f"{ranking_name} {key}: {summary[key]} != {value}"
        score_key = next(k for k in rounded if k.startswith("returned_score"))
        res = results[ranking_name]
        assert_close((res.medium.map + res.hard.map) / 2, rounded[score_key], tolerance, score_key)


@pytest.mark.parametrize("name", fixtures_of_kind("ames", "revisited_map"))
def test_rectangular_ap_without_junk(ames: MethodFixtures, name: str) -> None:
    """GLDv2-style rectangular AP with relevant = easy + hard and no junk."""
    case = RevisitedCase(ames, name)
    positives = [list(g["easy"]) + list(g["hard"]) for g in case.gnd]
    for m, expected in case.expected(r"^(?P<ranking>\w+?)_rectangular_okOnly_(?P<field>map|aps)$"):
        result = mean_average_precision(case.rankings[m["ranking"]], positives, kind="rectangular")
        assert_close(getattr(result, RESULT_FIELDS[m["field"]]), expected, case.tolerance, m.string)
