"""Display: configuration reprs of losses, miners, samplers, models and evaluators; HTML tables of results."""

from __future__ import annotations

import inspect
import math
import re
from html.parser import HTMLParser
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

import objretrieval
import objretrieval.losses as losses
import objretrieval.miners as miners
import objretrieval.samplers as samplers
from objretrieval.data.transforms import DINOMultiCrop
from objretrieval.display import ConfigRepr, config_repr, html_table, per_query_html
from objretrieval.metrics import RetrievalEvaluator
from objretrieval.metrics.revisited import gldv2_map, revisited_map
from objretrieval.metrics.streaming import RetrievalMetrics
from objretrieval.models import AMES, AVSL, MIC, MILE, CVNetBackbone, get_model_entry
from objretrieval.search import Neighbors, knn
from objretrieval.training.mic import InterclassClusters, MICTraining
from objretrieval.training.mile import MILESelfSupervised
from objretrieval.training.schedules import DINOSchedules

# --------------------------------------------------------------------------------- configuration reprs

LABELS = np.repeat(np.arange(8), 4)  # 8 classes of 4 samples
TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}  # timm overrides that make any ViT small


def same_class(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[:, None] == b[None]


#: Every exported loss, miner and sampler class with the arguments it is built with, at least one of them not
#: its default. test_the_tables_list_every_exported_class fails when a class is exported without an entry.
CONFIGURED: dict[type, dict[str, Any]] = {
    losses.AVSLMarginLoss: {"num_classes": 4, "hardneg_cutoff": 0.25},
    losses.AVSLPairwiseProxyAnchorLoss: {"alpha": 8.0, "level_weights": (1.0, 2.0, 2.0)},
    losses.AVSLProxyAnchorLoss: {"num_classes": 4, "embed_dim": 8, "final_alpha": 8.0},
    losses.AdversarialDecorrelationLoss: {"class_dim": 4, "aux_dim": 6, "proj_dim": 8},
    losses.ContextualLoss: {"k": 3, "slope": 5.0},
    losses.ContrastiveLoss: {"neg_margin": 0.25, "tiled": True},
    losses.CrossBatchMemory: {"loss": losses.ContrastiveLoss(), "size": 16, "embedding_size": 8},
    losses.DINOLoss: {"out_dim": 8, "ncrops": 4, "warmup_teacher_temp_epochs": 2, "epochs": 5},
    losses.MarginLoss: {"nu": 0.01, "normalizer": "active_triplets"},
    losses.MetricLoss: {"normalize_embeddings": False, "label_comparison": same_class},
    losses.MultiSimilarityLoss: {"base": 0.25, "mining_epsilon": 0.125},
    losses.PairBCELoss: {"pos_weight": 2.0, "reduction": "sum"},
    losses.PairDistillationLoss: {"kind": "mse", "pos_weight": 3.0},
    losses.ParametricLoss: {"normalize_embeddings": False},
    losses.ProxyAnchorLoss: {"num_classes": 4, "embedding_size": 8, "alpha": 16.0},
    losses.ProxyNCALoss: {"num_classes": 4, "embedding_size": 8, "softmax_scale": 3.0},
    losses.ROADMAPLoss: {"rho": 50.0, "rank_query_itself": True},
    losses.SmoothAPLoss: {"tau": 0.125},
    losses.SupConLoss: {"temperature": 0.25, "tile_size": 16},
    losses.TripletMarginLoss: {"selection": "hard", "distance": "cosine"},
    miners.DistanceWeightedMiner: {"nonzero_loss_cutoff": 1.25, "triplets_per_anchor": 2},
    miners.Miner: {"label_comparison": same_class},
    miners.MultiSimilarityMiner: {"epsilon": 0.25},
    miners.TripletMarginMiner: {"selection": "semihard"},
    samplers.ClusterBatchSampler: {"labels": LABELS, "batch_size": 8, "m": 2, "random_pick_p": 0.5},
    samplers.HierarchicalSampler: {
        "labels": LABELS,
        "super_labels": LABELS // 4,
        "batch_size": 8,
        "m": 2,
        "seed": 3,
    },
    samplers.MPerClassSampler: {"labels": LABELS, "batch_size": 8, "m": 2, "small_classes": "drop"},
    samplers.PseudoLabelledDataset: {"dataset": [0, 1]},
}

#: Per class that a registered builder returns: arguments that keep it small, at least one not the default.
MODEL_ARGUMENTS: dict[type, dict[str, Any]] = {
    AMES: {"model_dim": 32},
    AVSL: {"embed_dim": 16, "topk": 5},
    CVNetBackbone: {"global_dim": 16},
    MIC: {"class_dim": 16},
    MILE: {"backbone_kwargs": TINY_VIT, "lora_r": 4, "head_dim": 16, "head_hidden_dim": 32},
}

#: Constructor arguments a repr leaves out, and why.
NOT_SHOWN: dict[type, set[str]] = {
    # the initial value of learnable per-class margins, which are state
    losses.AVSLMarginLoss: {"beta"},
    MICTraining: {"beta"},
    # AMES keeps these only in its layers (objretrieval/models/ames.py): remove them here once it shows them
    AMES: {"nhead", "num_encoder_layers", "dim_feedforward", "activation", "normalize_before"},
}


def exported(module: Any, kind: type) -> set[type]:
    objects = (getattr(module, name) for name in module.__all__)
    return {obj for obj in objects if inspect.isclass(obj) and issubclass(obj, kind)}


def built_class(model_name: str) -> type:
    """The class a registered builder returns, from its annotation (nothing is built)."""
    builder = get_model_entry(model_name).builder
    return inspect.signature(builder, eval_str=True).return_annotation


def test_the_tables_list_every_exported_class() -> None:
    # the losses' and miners' data containers (PairBatch, MinedPairs, ...) are not modules
    every = exported(losses, nn.Module) | exported(miners, nn.Module) | exported(samplers, object)
    assert set(CONFIGURED) == every
    assert set(MODEL_ARGUMENTS) == {built_class(name) for name in objretrieval.list_models()}


def own_text(obj: Any) -> str:
    """What an object says about its own configuration: a module's extra_repr (not its children's)."""
    return obj.extra_repr() if isinstance(obj, nn.Module) else repr(obj)


def shown_as(value: Any) -> str | None:
    """The text a configuration value is shown as; None for data and parts (arrays, modules)."""
    if isinstance(value, (np.ndarray, torch.Tensor, nn.Module)):
        return None
    return value.__qualname__ if inspect.isfunction(value) else repr(value)


def has(text: str, name: str, value: str | None = None) -> bool:
    """Whether ``text`` lists ``name=value`` (``name=`` anything, when ``value`` is None)."""
    shown = r"[^,)]*" if value is None else re.escape(value)
    return re.search(rf"(?<![\w.]){re.escape(name)}={shown}(?=, |\)|$)", text) is not None


def check_configuration(obj: Any, arguments: dict[str, Any], *, class_defaults: bool = True) -> None:
    """``obj``, built with ``arguments``, shows each of them and every other argument of its constructor (with
    its default, when ``class_defaults``; builders change some), except those of :data:`NOT_SHOWN`."""
    cls = type(obj)
    assert repr(obj).startswith(f"{cls.__name__}(")
    text = own_text(obj)
    parameters = inspect.signature(cls.__init__).parameters
    changed = [n for n, v in arguments.items() if parameters[n].default not in (parameters[n].empty, v)]
    assert changed or all(p.default is p.empty for p in list(parameters.values())[1:]), "nothing changed"
    for name, value in arguments.items():
        expected = shown_as(value)
        assert has(text, name, expected) != (expected is None), (name, expected, text)
    hidden = NOT_SHOWN.get(cls, set())
    for name, parameter in list(parameters.items())[1:]:
        if name in arguments or parameter.default is parameter.empty or parameter.default is None:
            continue  # a None default is resolved at construction (a rank, a device) or means "absent"
        if name in hidden:
            assert not has(text, name), f"{cls.__name__} now shows {name}: remove it from NOT_SHOWN"
        else:
            assert has(text, name, repr(parameter.default) if class_defaults else None), (name, text)


@pytest.mark.parametrize(("cls", "arguments"), CONFIGURED.items(), ids=[c.__name__ for c in CONFIGURED])
def test_losses_miners_and_samplers_print_their_configuration(cls: type, arguments: dict[str, Any]) -> None:
    check_configuration(cls(**arguments), arguments)


@pytest.mark.parametrize("name", objretrieval.list_models())
def test_registered_models_print_their_configuration(name: str) -> None:
    arguments = MODEL_ARGUMENTS[built_class(name)]
    model = objretrieval.create_model(name, **arguments)
    check_configuration(model, arguments, class_defaults=False)
    assert repr(model).splitlines()[1].strip() == model.extra_repr()  # above the layers


def test_evaluators_print_their_configuration() -> None:
    arguments = {"metrics": ("recall@1", "map@r"), "metric": "ip", "block_size": 64}
    check_configuration(RetrievalEvaluator(**arguments, label_comparison_fn=same_class), arguments)
    assert "label_comparison_fn=same_class" in repr(RetrievalEvaluator(label_comparison_fn=same_class))
    streaming = {**arguments, "storage_dtype": torch.float16}
    check_configuration(RetrievalMetrics(**streaming), streaming)
    pytest.importorskip("torchmetrics")
    from objretrieval.metrics.torchmetrics_adapter import TorchmetricsRetrieval

    check_configuration(TorchmetricsRetrieval(**streaming), streaming)


def test_training_helpers_and_transforms_print_their_configuration() -> None:
    check_configuration(InterclassClusters(5, update_every=2), {"update_every": 2})
    check_configuration(DINOMultiCrop(n_local=2, photometric=False), {"n_local": 2, "photometric": False})
    mic = objretrieval.create_model("mic_resnet10")
    arguments = {"num_classes": 5, "num_clusters": 3, "adversarial_weight": 10.0}
    check_configuration(MICTraining(mic, **arguments), {"model": mic, **arguments})
    student = MILE("vit_small_patch14_reg4_dinov2", backbone_kwargs=TINY_VIT, lora_r=0, head_dim=8)
    loss = losses.DINOLoss(8)
    check_configuration(
        MILESelfSupervised(student, loss, clip_grad=1.0), {"student": student, "clip_grad": 1.0}
    )


def test_schedules_print_their_range_not_their_values() -> None:
    schedules = DINOSchedules.create(epochs=2, iters_per_epoch=5, lr=0.5, min_lr=0.25, warmup_epochs=1)
    text = repr(schedules)
    assert text.startswith("DINOSchedules(iterations=10, lr=(start=0, max=0.5, end=")
    assert "weight_decay=(start=0.04, max=" in text and "momentum=(start=0.996, max=" in text
    assert "array" not in text and "[" not in text


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
    assert "label_comparison=same_class" in repr(loss)


def test_a_class_may_rename_hide_or_read_arguments_from_its_parts() -> None:
    class Renamed:
        config_attributes: ClassVar[dict[str, str | None]] = {
            "width": "_width",
            "secret": None,
            "depth": "part.depth",  # an attribute of a part
            "rate": "options.rate",  # a key of a dict
        }

        def __init__(self, width: int = 3, secret: str = "x", depth: int = 1, rate: float = 0.5) -> None:
            self._width, self.secret = width, secret
            self.part: Any = SimpleNamespace(depth=depth)
            self.options = {"rate": rate}

    renamed = Renamed(7, depth=2)
    assert config_repr(renamed) == "width=7, depth=2, rate=0.5"
    renamed.part = None  # a part that is absent leaves its arguments out
    assert config_repr(renamed) == "width=7, rate=0.5"


def test_the_mixin_prints_plain_objects_and_keeps_a_modules_children() -> None:
    class Plain(ConfigRepr):
        def __init__(self, size: int = 3) -> None:
            self.size = size

    class Module(ConfigRepr, nn.Module):
        def __init__(self, size: int = 3) -> None:
            super().__init__()
            self.size, self.layer = size, nn.Identity()

    assert repr(Plain(4)) == "Plain(size=4)"
    assert repr(Module(4)).splitlines() == ["Module(", "  size=4", "  (layer): Identity()", ")"]


# --------------------------------------------------------------------------------- HTML tables


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
