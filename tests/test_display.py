"""Display: configuration reprs of losses, miners, samplers, models, evaluators, rerankers and extractors;
summaries of the objects that hold data; HTML tables of results."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import objretrieval
import objretrieval.descriptors as descriptors
import objretrieval.losses as losses
import objretrieval.miners as miners
import objretrieval.reranking as reranking
import objretrieval.samplers as samplers
from objretrieval.data.transforms import DINOMultiCrop
from objretrieval.display import (
    ConfigRepr,
    SummaryRepr,
    config_repr,
    html_table,
    per_query_html,
    summary_value,
)
from objretrieval.metrics import RetrievalEvaluator
from objretrieval.metrics.revisited import gldv2_map, revisited_map
from objretrieval.metrics.streaming import RetrievalMetrics
from objretrieval.models import AMES, AVSL, MIC, MILE, CVNetBackbone, get_model_entry
from objretrieval.models.ames import BinarizationLayer
from objretrieval.search import Neighbors, knn
from objretrieval.training.mic import InterclassClusters, MICTraining
from objretrieval.training.mile import MILESelfSupervised
from objretrieval.training.schedules import DINOSchedules
from tests.tiny_models import tiny_dinov2_vit

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


#: Values that are data or parts, never configuration: a repr leaves them out (a module prints as a child).
DATA = (
    np.ndarray,
    torch.Tensor,
    nn.Module,
    descriptors.DescriptorStore,
    descriptors.BinaryCodeStore,
    reranking.DatabaseCache,
)


def shown_as(value: Any) -> str | None:
    """The text a configuration value is shown as; None for data and parts (arrays, modules, stores, and
    tuples of them)."""
    if isinstance(value, DATA) or (isinstance(value, tuple) and any(isinstance(v, DATA) for v in value)):
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


# ------------------------------------------------------------------ reranking, descriptors, summaries


def tiny_ames(**overrides: Any) -> AMES:
    torch.manual_seed(0)
    arguments = {"local_dim": 16, "model_dim": 16, "nhead": 2, "num_encoder_layers": 1, "dim_feedforward": 32}
    return AMES(**{**arguments, **overrides}).eval()


def local_descriptors(images: int, descriptors_per_image: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(images, T, 16) random descriptors and a padding mask with the last slot of image 0 padded."""
    local = torch.randn(images, descriptors_per_image, 16, generator=torch.Generator().manual_seed(seed))
    padding = torch.zeros(images, descriptors_per_image, dtype=torch.bool)
    padding[0, -1] = True
    return local, padding


def tiny_vit() -> nn.Module:
    return tiny_dinov2_vit(**TINY_VIT)


#: Every exported class of objretrieval.reranking and objretrieval.descriptors that takes configuration, with a
#: builder of its arguments (given a temporary folder), at least one not its default.
CONFIGURED_PARTS: dict[type, Callable[[Path], dict[str, Any]]] = {
    reranking.AMESScorer: lambda tmp: {
        "model": tiny_ames(),
        "queries": local_descriptors(3, 5),
        "database": local_descriptors(4, 6, seed=1),
        "database_descriptors": 4,
        "batch_size": 2,
        "autocast": False,
        "amp_dtype": torch.bfloat16,
    },
    descriptors.CVNetLocalExtractor: lambda tmp: {
        "backbone": CVNetBackbone(global_dim=16),
        "detector": descriptors.SpatialAttention2d(1024),
        "topk": 20,
        "scales": (1.0,),
    },
    descriptors.DINOv2LocalExtractor: lambda tmp: {"backbone": tiny_vit(), "topk": 12, "scales": (1.0, 0.5)},
    descriptors.SpatialAttention2d: lambda tmp: {"channels": 8},
}


def ranked(num_queries: int, depth: int) -> tuple[Tensor, Tensor]:
    """(scores, indices) of a shortlist: descending scores, distinct ids."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(num_queries, depth, generator=g).sort(1, True).values
    return scores, torch.stack([torch.randperm(depth, generator=g) for _ in range(num_queries)])


def sweep() -> reranking.RevisitedReranking:
    """The revisited sweep over 2 values of k, on a table of raw scores."""
    scores, indices = ranked(2, 6)
    gnd = [{"easy": [0, 1], "hard": [2], "junk": [3]}, {"easy": [4], "hard": [5], "junk": []}]
    table = reranking.TableScorer(torch.randn(2, 6, generator=torch.Generator().manual_seed(2)))
    return reranking.rerank_revisited(
        table, reranking.Shortlist(scores, indices), gnd, top_k=(2, 3), lamb=(0.25,), temp=(2.0,)
    )


def shortlist_with_a_missing_entry() -> tuple[reranking.Shortlist, dict[str, str]]:
    scores, indices = ranked(3, 4)
    indices[1, 3] = reranking.MISSING
    return reranking.Shortlist(scores, indices), {"queries": "3", "depth": "4", "missing": "1"}


def database_cache(tmp: Path, binarized: bool) -> tuple[reranking.DatabaseCache, dict[str, str]]:
    cache = reranking.DatabaseCache.build(tiny_ames(binarized=binarized), local_descriptors(4, 6))
    # 6 tokens of 16 float16 numbers, or 6 codes of 16 bits
    per_image = 6 * 16 // 8 if binarized else 6 * 16 * 2
    shown = {
        "images": "4",
        "descriptors": "6",
        "binarized": repr(binarized),
        "bytes_per_image": str(per_image),
    }
    return cache, shown


def best_combination(tmp: Path) -> tuple[reranking.Combination, dict[str, str]]:
    best = sweep().best
    maps = {"medium_map": repr(best.medium.medium.map), "hard_map": repr(best.hard.hard.map)}
    return best, {"k": repr(best.k), "lamb": "0.25", "temp": "2.0", **maps}


def sweep_result(tmp: Path) -> tuple[reranking.RevisitedReranking, dict[str, str]]:
    result = sweep()
    return result, {"combinations": "2", "best": repr(result.best), "missing": "0"}


def descriptor_store(tmp: Path) -> tuple[descriptors.DescriptorStore, dict[str, str]]:
    path = tmp / "local.h5"
    descriptors.DescriptorStore.create(path, 3, 4, 8).close()
    store = descriptors.DescriptorStore(path)
    return store, {"path": repr(str(path)), "mode": "'r'", "images": "3", "topk": "4", "dim": "8"}


def code_store(tmp: Path) -> tuple[descriptors.BinaryCodeStore, dict[str, str]]:
    path = tmp / "codes.h5"
    store = descriptors.BinaryCodeStore.create(path, 3, 5, bits=16)
    return store, {"path": repr(str(path)), "mode": "'r+'", "images": "3", "descriptors": "5", "bits": "16"}


def scale_features(tmp: Path) -> tuple[descriptors.ScaleFeatures, dict[str, str]]:
    features = descriptors.ScaleFeatures(torch.randn(6, 8), torch.rand(6), torch.rand(6, 2).double())
    return features, {
        "descriptors": "Tensor(shape=(6, 8), dtype=float32)",
        "weights": "Tensor(shape=(6,), dtype=float32)",
        "locations": "Tensor(shape=(6, 2), dtype=float64)",
    }


#: Every exported class of objretrieval.reranking and objretrieval.descriptors that holds data, with a builder
#: of one (given a temporary folder) and the ``name=value`` texts its summary must show.
SUMMARISED: dict[type, Callable[[Path], tuple[Any, dict[str, str]]]] = {
    reranking.Combination: best_combination,
    reranking.DatabaseCache: lambda tmp: database_cache(tmp, binarized=False),
    reranking.RevisitedReranking: sweep_result,
    reranking.Shortlist: lambda tmp: shortlist_with_a_missing_entry(),
    reranking.TableScorer: lambda tmp: (
        reranking.TableScorer(torch.zeros(3, 7, dtype=torch.float16)),
        {"scores": "Tensor(shape=(3, 7), dtype=float16)"},
    ),
    descriptors.BinaryCodeStore: code_store,
    descriptors.DescriptorStore: descriptor_store,
    descriptors.ScaleFeatures: scale_features,
}


def printing_classes(module: Any) -> set[type]:
    """A module's exported classes, less the protocols (no instances) and NamedTuples (which print their
    fields themselves)."""
    return {
        cls
        for cls in exported(module, object)
        if not getattr(cls, "_is_protocol", False) and not issubclass(cls, tuple)
    }


def assert_summarised(text: str) -> None:
    """No default object repr and no tensor or array contents."""
    assert "object at 0x" not in text and "tensor(" not in text and "array(" not in text, text
    assert "[[" not in text, text


def test_the_reranking_and_descriptor_tables_list_every_exported_class() -> None:
    every = printing_classes(reranking) | printing_classes(descriptors)
    assert set(CONFIGURED_PARTS) | set(SUMMARISED) == every
    assert not set(CONFIGURED_PARTS) & set(SUMMARISED)


@pytest.mark.parametrize("cls", CONFIGURED_PARTS, ids=[c.__name__ for c in CONFIGURED_PARTS])
def test_rerankers_and_extractors_print_their_configuration(cls: type, tmp_path: Path) -> None:
    arguments = CONFIGURED_PARTS[cls](tmp_path)
    obj = cls(**arguments)
    check_configuration(obj, arguments)
    assert_summarised(own_text(obj))


@pytest.mark.parametrize("cls", SUMMARISED, ids=[c.__name__ for c in SUMMARISED])
def test_objects_holding_data_print_a_summary(cls: type, tmp_path: Path) -> None:
    obj, shown = SUMMARISED[cls](tmp_path)
    assert type(obj) is cls
    text = repr(obj)
    if isinstance(obj, (descriptors.DescriptorStore, descriptors.BinaryCodeStore)):
        obj.close()
    assert text.startswith(f"{cls.__name__}(") and text.endswith(")")
    for name, value in shown.items():
        assert has(text, name, value), (name, value, text)
    assert_summarised(text)


def test_a_binarized_cache_and_a_closed_store_say_so(tmp_path: Path) -> None:
    cache, shown = database_cache(tmp_path, binarized=True)
    assert all(has(repr(cache), name, value) for name, value in shown.items()), repr(cache)
    store, _ = descriptor_store(tmp_path)
    store.close()  # its datasets can no longer be read: the summary says so instead of failing
    assert repr(store) == f"DescriptorStore(path={str(tmp_path / 'local.h5')!r}, closed=True)"


def test_ames_and_its_layers_print_their_configuration() -> None:
    arguments = {
        "local_dim": 16,
        "model_dim": 16,
        "nhead": 4,
        "num_encoder_layers": 2,
        "dim_feedforward": 32,
        "activation": "gelu",
        "normalize_before": True,
        "binarized": True,
    }
    model = AMES(**arguments)
    check_configuration(model, arguments)
    layer = {key: arguments[key] for key in ("nhead", "dim_feedforward", "activation", "normalize_before")}
    check_configuration(model.decoder.layers[1], {"d_model": 16, **layer})
    check_configuration(model.decoder, {"num_layers": 2, "final_norm": True})
    assert not has(own_text(model.decoder), "layer_args")  # each layer shows its own
    check_configuration(BinarizationLayer(16, 8, sigma=0.5), {"dims": 16, "bits": 8, "sigma": 0.5})
    text = repr(model)
    assert "(0): BinarizationLayer(dims=16, bits=16, sigma=1e-06)" in text
    assert "num_layers=2, final_norm=True" in text
    # torch prints identical layers once, "(0-1): 2 x AMESLayer(", each of them with its configuration
    assert "(0-1): 2 x AMESLayer(\n        d_model=16, nhead=4, dim_feedforward=32, activation='gelu'" in text


def test_results_print_per_query_values_and_tokens_as_shapes() -> None:
    x = torch.randn(24, 6, generator=torch.Generator().manual_seed(0))
    result = RetrievalEvaluator(("precision@1", "map@r"), return_per_query=True)(x, torch.arange(24) % 5)
    text = repr(result)
    metrics = ", ".join(f"{name!r}: {value!r}" for name, value in result.metrics.items())
    assert f"metrics={{{metrics}}}" in text
    shapes = "'precision@1': Tensor(shape=(24,), dtype=float64), 'map@r': Tensor(shape=(24,), dtype=float64)"
    assert f"per_query={{{shapes}}}" in text and "num_queries=24" in text
    assert_summarised(text)
    projected = tiny_ames().project_query(*local_descriptors(2, 5))
    assert repr(projected) == (
        "ProjectedDescriptors(tokens=Tensor(shape=(2, 5, 16), dtype=float32), "
        "keep=Tensor(shape=(2, 5), dtype=bool))"
    )


def test_summary_value_shows_shapes_numbers_and_short_sequences() -> None:
    class Pair(NamedTuple):
        a: int
        b: int

    assert summary_value(torch.tensor(0.5)) == "0.5"  # a 0-d tensor is a number
    assert summary_value(np.zeros((2, 3), dtype=np.int64)) == "ndarray(shape=(2, 3), dtype=int64)"
    assert summary_value(torch.empty(0)) == "Tensor(shape=(0,), dtype=float32)"
    assert summary_value(np.float64(0.25)) == "0.25"
    assert summary_value((torch.ones(2),)) == "(Tensor(shape=(2,), dtype=float32),)"
    assert summary_value(list(range(20))) == "list(len=20)"
    assert summary_value({"a": [1, 2]}) == "{'a': [1, 2]}"
    assert summary_value(Pair(1, 2)) == "Pair(a=1, b=2)"


def test_the_summary_mixin_reads_a_dataclass_and_leaves_out_hidden_fields() -> None:
    @dataclasses.dataclass(repr=False)
    class Held(SummaryRepr):
        values: Tensor
        name: str = "x"
        cache: Any = dataclasses.field(default=None, repr=False)

    assert (
        repr(Held(torch.zeros(4, 2), cache=1)) == "Held(values=Tensor(shape=(4, 2), dtype=float32), name='x')"
    )


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


def test_revisited_and_gldv2_reprs_show_means_not_per_query_tensors() -> None:
    ranking = torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(q)) for q in range(3)])
    gnd = [{"easy": [0, 1], "hard": [2], "junk": [3]}, {"easy": [4], "hard": [6], "junk": []}]
    revisited = revisited_map(ranking[:2], gnd, kappas=(1, 5))
    text = repr(revisited)
    assert text.startswith("RevisitedResult(easy=ProtocolResult(map=")
    for protocol in (revisited.easy, revisited.medium, revisited.hard):
        assert f"map={protocol.map!r}, mean_precision={protocol.mean_precision.tolist()!r}" in text
    assert "kappas=(1, 5), queries=2" in text and "tensor(" not in text
    gldv2 = gldv2_map(ranking, [[0, 1], [4], [5, 6]], depth=10, num_private=1)
    assert repr(gldv2) == (
        f"GLDv2Result(map={gldv2.map!r}, ap=Tensor(shape=(3,), dtype={str(gldv2.ap.dtype)[6:]}), "
        f"public={gldv2.public!r}, private={gldv2.private!r})"
    )


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
