"""Display: configuration reprs of losses, miners and samplers; HTML tables of results and neighbours."""

from __future__ import annotations

import inspect
import math
from html.parser import HTMLParser
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import objretrieval.losses as losses
import objretrieval.miners as miners
from objretrieval.display import config_repr, html_table, per_query_html
from objretrieval.losses import MetricLoss
from objretrieval.metrics import RetrievalEvaluator
from objretrieval.metrics.revisited import gldv2_map, revisited_map
from objretrieval.miners import Miner
from objretrieval.samplers import ClusterBatchSampler, HierarchicalSampler, MPerClassSampler
from objretrieval.search import Neighbors, knn

# the required arguments of the constructors, by name
REQUIRED = {"num_classes": 5, "embedding_size": 8}
LOSSES = [
    getattr(losses, name)
    for name in losses.__all__
    if inspect.isclass(getattr(losses, name))
    and issubclass(getattr(losses, name), MetricLoss)
    and not inspect.isabstract(getattr(losses, name))
    and getattr(losses, name) not in (MetricLoss, losses.ParametricLoss)
]
MINERS = [getattr(miners, n) for n in miners.__all__ if inspect.isclass(getattr(miners, n))]
MINERS = [m for m in MINERS if issubclass(m, Miner) and m is not Miner]


def build(cls: type, **overrides: Any) -> Any:
    signature = inspect.signature(cls.__init__)
    required = {
        name: REQUIRED[name]
        for name, p in signature.parameters.items()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name != "self"
    }
    return cls(**required, **overrides)


def first_float_argument(cls: type) -> tuple[str, float] | None:
    """A float argument with its default changed, to check a non-default value is shown."""
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if isinstance(p.default, float) and not isinstance(p.default, bool):
            return name, p.default / 2 + 0.0625  # stays in every range checked (margins in [-1, 1], > 0)
    return None


def defaults_shown(cls: type, text: str) -> None:
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if isinstance(p.default, (bool, int, float, str)) and f"{name}=" in text:
            assert f"{name}={p.default!r}" in text, (name, text)


@pytest.mark.parametrize("cls", LOSSES + MINERS, ids=lambda c: c.__name__)
def test_loss_and_miner_reprs_list_their_arguments(cls: type) -> None:
    text = repr(build(cls))
    assert text.startswith(f"{cls.__name__}(") and text != f"{cls.__name__}()"
    defaults_shown(cls, text)
    changed = first_float_argument(cls)
    if changed is not None:
        name, value = changed
        assert f"{name}={value!r}" in repr(build(cls, **{name: value})), name


def test_contrastive_repr_matches_its_constructor() -> None:
    loss = losses.ContrastiveLoss(pos_margin=0.9, reduction="sum")
    assert repr(loss).startswith("ContrastiveLoss(pos_margin=0.9, neg_margin=0.5, reduction='sum',")
    assert "label_comparison=None" in repr(loss)


def test_repr_shows_float32_parameters_as_given_and_skips_state() -> None:
    fixed = losses.MarginLoss(beta=1.3)  # beta is a one-number float32 tensor
    assert "beta=1.3," in repr(fixed)
    learned = losses.MarginLoss(4, beta=1.3)  # one beta per class: state, not shown
    assert " beta=" not in repr(learned) and "num_classes=4" in repr(learned)
    assert "proxies" not in repr(losses.ProxyAnchorLoss(5, 8))


def test_config_repr_never_fails_and_names_callables() -> None:
    def same_class(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a[:, None] == b[None]

    class Odd:
        def __init__(self, a: Any, b: Any = (1, 2), *args: Any, c: Any = None, d: Any = None, **kw: Any):
            self.a, self.b, self.d = a, b, d  # c is not stored

        @property
        def d(self) -> Any:
            raise RuntimeError("broken")

        @d.setter
        def d(self, value: Any) -> None:
            pass

    assert config_repr(Odd(np.arange(100))) == "b=(1, 2)"  # a: an array (state); c absent; d raises
    loss = losses.SupConLoss(label_comparison=same_class)
    assert "label_comparison=test_config_repr_never_fails_and_names_callables.<locals>.same_class" in repr(
        loss
    )


def test_a_class_may_rename_or_hide_arguments() -> None:
    class Renamed:
        config_attributes: ClassVar[dict[str, str | None]] = {"width": "_width", "secret": None}

        def __init__(self, width: int = 3, secret: str = "x") -> None:
            self._width, self.secret = width, secret

    assert config_repr(Renamed(7)) == "width=7"


LABELS = np.repeat(np.arange(8), 4)
SAMPLERS = [
    (MPerClassSampler, {"labels": LABELS, "batch_size": 8, "m": 2}),
    (ClusterBatchSampler, {"labels": LABELS, "batch_size": 8, "m": 2}),
    (HierarchicalSampler, {"labels": LABELS, "super_labels": LABELS // 4, "batch_size": 8, "m": 2}),
]


@pytest.mark.parametrize(("cls", "arguments"), SAMPLERS, ids=lambda c: getattr(c, "__name__", ""))
def test_sampler_reprs_list_their_arguments(cls: type, arguments: dict[str, Any]) -> None:
    text = repr(cls(**arguments, seed=7))
    assert text.startswith(f"{cls.__name__}(")
    for expected in ("batch_size=8", "m=2", "seed=7", "world_size=1"):
        assert expected in text
    assert "[" not in text and "array" not in text  # the label arrays are data, not configuration


class TableParser(HTMLParser):
    """Checks that tags are balanced and collects the text of the cells."""

    VOID: ClassVar[set[str]] = {"br", "hr", "img"}

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.cells: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, (self.open, tag)
        self.open.pop()

    def handle_data(self, data: str) -> None:
        if self.open and self.open[-1] in ("td", "th"):
            self.cells.append(data)


def parse(text: str) -> TableParser:
    parser = TableParser()
    parser.feed(text)
    parser.close()
    assert parser.open == [], parser.open
    return parser


def test_html_table_escapes_text() -> None:
    parser = parse(html_table([["<b>&", 0.5]], ["a<", "b"], caption="<x>", note="1 < 2"))
    assert parser.cells == ["a<", "b", "<b>&", "0.5000"]


def test_retrieval_result_html_has_metrics_counts_and_per_query_values() -> None:
    x = torch.randn(24, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(24) % 5
    y[0] = 99  # a query with no relevant item: NaN per-query values
    result = RetrievalEvaluator(("precision@1", "map@r"), return_per_query=True)(x, y)
    text = result._repr_html_()
    parser = parse(text)
    for name, value in result.metrics.items():
        assert name in parser.cells and f"{value:.4f}" in parser.cells
    assert "24 queries, 1 without relevant items" in text and "first 10 of 24 queries" in text

    per_query = per_query_html(result.per_query)
    assert per_query in text
    p1, mapr = result.per_query["precision@1"].tolist(), result.per_query["map@r"].tolist()
    expected = [c for q in range(10) for c in (str(q), f"{p1[q]:.4f}", f"{mapr[q]:.4f}")]
    assert parse(per_query).cells == ["query", "precision@1", "map@r", *expected]
    assert expected[1] == "nan"


def test_revisited_and_gldv2_html_contain_their_values() -> None:
    ranking = torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(q)) for q in range(3)])
    gnd = [{"easy": [0, 1], "hard": [2], "junk": [3]}, {"easy": [4], "hard": [], "junk": []}]
    gnd.append({"easy": [5], "hard": [6, 7], "junk": [8]})
    revisited = revisited_map(ranking, gnd, kappas=(1, 5))
    parser = parse(revisited._repr_html_())
    for protocol in (revisited.easy, revisited.medium, revisited.hard):
        assert f"{protocol.map:.4f}" in parser.cells
        assert all(f"{v:.4f}" in parser.cells for v in protocol.mean_precision.tolist())
    assert "mP@5" in parser.cells and "nan" in parser.cells  # query 1 has no hard item

    gldv2 = gldv2_map(ranking, [[0, 1], [4], [5, 6]], depth=10, num_private=1)
    parser = parse(gldv2._repr_html_())
    assert gldv2.public is not None and gldv2.private is not None
    for value in (gldv2.map, gldv2.public, gldv2.private, *gldv2.ap.tolist()):
        assert f"{value:.4f}" in parser.cells


def test_neighbors_html_is_truncated_with_a_note() -> None:
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    neighbors = knn(x, x, k=20)
    text = neighbors._repr_html_()
    parser = parse(text)
    assert "first 10 of 40 queries, first 8 of 20 neighbours" in text
    shown = [c for c in parser.cells if "(" in c]
    assert len(shown) == 10 * 8
    expected = [
        f"{i} ({s:.4f})"
        for i, s in zip(
            neighbors.indices[:10, :8].flatten().tolist(),
            neighbors.scores[:10, :8].flatten().tolist(),
            strict=True,
        )
    ]
    assert shown == expected


def test_neighbors_html_marks_missing_slots() -> None:
    neighbors = Neighbors(torch.tensor([[0.9, -math.inf]]), torch.tensor([[3, -1]]))
    text = neighbors._repr_html_()
    assert parse(text).cells[-2:] == ["3 (0.9000)", "-"]
    assert "1 queries, 2 neighbours; 1 missing slots" in text


@pytest.mark.parametrize(
    ("loss", "shown"),
    [
        (lambda: losses.DINOLoss(out_dim=8), "out_dim=8"),
        (lambda: losses.PairBCELoss(), "reduction='mean'"),
        (lambda: losses.AdversarialDecorrelationLoss(class_dim=6, aux_dim=4), "class_dim=6, aux_dim=4"),
        (lambda: losses.CrossBatchMemory(losses.ContrastiveLoss(), 16), "size=16"),
    ],
)
def test_module_losses_outside_metric_loss_print_their_arguments(loss: Any, shown: str) -> None:
    text = repr(loss())
    assert shown in text, text


def test_models_print_their_configuration_above_their_layers() -> None:
    import objretrieval

    ames = objretrieval.create_model("dinov2_ames", num_encoder_layers=1, binarized=True)
    assert repr(ames).splitlines()[1].strip().startswith("local_dim=768, model_dim=128, binarized=True")
    mic = objretrieval.create_model("mic_resnet10", class_dim=32)
    assert "class_dim=32" in repr(mic).splitlines()[1]
