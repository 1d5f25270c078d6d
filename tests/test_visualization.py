"""objretrieval.visualization: what each picture shows, saving, input errors, and matplotlib being optional."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from objretrieval import knn  # noqa: E402
from objretrieval.metrics import RetrievalResult  # noqa: E402
from objretrieval.visualization import (  # noqa: E402
    draw_neighbours,
    draw_reranking,
    plot_recall_at_k,
    plot_set_embedding,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _flat_images(n: int, size: int = 6) -> torch.Tensor:
    """(n, 1, size, size) uint8 images, image i filled with the value 10 * i: each is recognisable when drawn."""
    return (10 * torch.arange(n, dtype=torch.uint8)).view(n, 1, 1, 1).expand(n, 1, size, size).contiguous()


def _drawn_value(ax) -> float:
    """The (single) value of the flat image drawn in ``ax``."""
    data = np.asarray(ax.images[0].get_array())
    assert np.ptp(data) == 0
    return float(data.flat[0])


def _frame(ax) -> tuple[float, ...]:
    return tuple(ax.spines["left"].get_edgecolor())


def _saved(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_neighbours_shows_each_querys_neighbours_framed_by_label(tmp_path: Path) -> None:
    gallery = _flat_images(8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    queries, query_labels = gallery[[0, 2]], labels[[0, 2]]
    embeddings = torch.randn(8, 4)
    neighbours = knn(embeddings[[0, 2]], embeddings, k=3, exclude=torch.tensor([0, 2]))
    path = tmp_path / "neighbours.png"
    fig = draw_neighbours(
        queries, gallery, neighbours, query_labels=query_labels, gallery_labels=labels, title="T", path=path
    )
    axes = np.array(fig.axes).reshape(2, 4)
    assert _saved(path)
    assert fig._suptitle.get_text() == "T"
    assert [ax.get_title() for ax in axes[0]] == ["query", "#1", "#2", "#3"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["query 0", "query 1"]
    for q in range(2):
        assert _drawn_value(axes[q, 0]) == pytest.approx(float(queries[q, 0, 0, 0]) / 255)
        for col, g in enumerate(neighbours.indices[q].tolist(), start=1):
            assert _drawn_value(axes[q, col]) == pytest.approx(10 * g / 255)
            expected = "green" if labels[g] == query_labels[q] else "red"
            assert _frame(axes[q, col]) == to_rgba(expected)


def test_draw_neighbours_takes_index_arrays_paths_float_and_gray_images(tmp_path: Path) -> None:
    images = torch.rand(3, 3, 5, 7)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        plt.imsave(paths[-1], image.permute(1, 2, 0).numpy())
    indices = np.array([[1, 2], [2, -1]])  # -1: a slot an approximate search left missing
    fig = draw_neighbours(paths[:2], paths, indices, k=2, titles=["a", "b"])
    axes = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["a", "b"]
    read = np.asarray(axes[0, 1].images[0].get_array())
    np.testing.assert_allclose(read[..., :3], images[1].permute(1, 2, 0).numpy(), atol=1 / 255)
    assert not axes[1, 2].images and not axes[1, 2].axison  # the missing slot is blank
    assert _frame(axes[0, 1]) != to_rgba("green")  # no labels, no verdict
    # float images in [0, 1] are drawn as they are; (N, H, W) is a batch of single-channel images
    gray = torch.rand(4, 5, 5)
    fig = draw_neighbours(gray[:1], gray, [[3]], cmap="gray_r")
    np.testing.assert_allclose(np.asarray(fig.axes[1].images[0].get_array()), gray[3].numpy(), rtol=1e-6)
    assert fig.axes[1].images[0].get_cmap().name == "gray_r"


def test_draw_neighbours_rejects_bad_input(tmp_path: Path) -> None:
    images = torch.rand(4, 3, 5, 5)
    good = torch.tensor([[1, 2]])
    with pytest.raises(
        ValueError, match=r"query_images must be \(N, C, H, W\) with N >= 1 and C in \(1, 3\)"
    ):
        draw_neighbours(torch.rand(1, 2, 5, 5), images, good)
    with pytest.raises(ValueError, match="query_images must be"):
        draw_neighbours(torch.rand(0, 3, 5, 5), images, torch.zeros(0, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="neighbors_or_indices must be Neighbors or a \\(1, depth\\)"):
        draw_neighbours(images[:1], images, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"neighbors_or_indices must lie in \[-1, 4\)"):
        draw_neighbours(images[:1], images, torch.tensor([[1, 4]]))
    with pytest.raises(ValueError, match="k=3 exceeds the 2 neighbours"):
        draw_neighbours(images[:1], images, good, k=3)
    with pytest.raises(ValueError, match="pass both query_labels and gallery_labels"):
        draw_neighbours(images[:1], images, good, query_labels=[0])
    with pytest.raises(ValueError, match="gallery_labels has 3 entries, expected 4"):
        draw_neighbours(images[:1], images, good, query_labels=[0], gallery_labels=[0, 1, 2])
    with pytest.raises(ValueError, match="titles must be a sequence of 1 strings"):
        draw_neighbours(images[:1], images, good, titles=["a", "b"])
    with pytest.raises(ValueError, match=r"gallery_images contains NaN or inf values \(first at row 3\)"):
        draw_neighbours(images[:1], images.clone().index_fill_(0, torch.tensor([3]), float("nan")), good)
    with pytest.raises(TypeError, match="query_images must be uint8 or floating point"):
        draw_neighbours(torch.ones(1, 3, 5, 5, dtype=torch.int32), images, good)
    plt.imsave(tmp_path / "x.png", np.zeros((4, 4)))
    with pytest.raises(FileNotFoundError, match=r"gallery_images\[1\] is not a file"):
        draw_neighbours(images[:1], [tmp_path / "x.png", tmp_path / "missing.png"], good)


def test_plot_recall_at_k_draws_one_curve_per_model(tmp_path: Path) -> None:
    trained = RetrievalResult(metrics={"recall@1": 0.5, "recall@4": 0.75, "recall@2": 0.6, "map@r": 0.2})
    path = tmp_path / "recall.png"
    fig = plot_recall_at_k({"trained": trained, "pixels": {1: 0.25, 2: 0.3, 4: 0.5, 8: 0.6}}, path=path)
    assert _saved(path)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["trained"].get_xdata()) == [1, 2, 4]
    np.testing.assert_allclose(lines["trained"].get_ydata(), [50, 60, 75])
    np.testing.assert_allclose(lines["pixels"].get_ydata(), [25, 30, 50, 60])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["trained", "pixels"]
    fig = plot_recall_at_k({"trained": trained, "pixels": {1: 0.25, 2: 0.3, 4: 0.5}}, ks=[4, 1])
    assert [list(line.get_xdata()) for line in fig.axes[0].get_lines()] == [[1, 4], [1, 4]]


def test_plot_recall_at_k_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="results must be a non-empty mapping"):
        plot_recall_at_k({})
    with pytest.raises(ValueError, match=r"results\['m'\] has no recall@K values"):
        plot_recall_at_k({"m": RetrievalResult(metrics={"map@r": 0.3})})
    with pytest.raises(ValueError, match=r"results\['m'\]\[1\] must be a recall in \[0, 1\], got 50"):
        plot_recall_at_k({"m": {1: 50}})
    with pytest.raises(ValueError, match="must be a recall in"):
        plot_recall_at_k({"m": {1: float("nan")}})
    with pytest.raises(TypeError, match=r"results\['m'\] must be a RetrievalResult or a mapping"):
        plot_recall_at_k({"m": [0.5]})
    with pytest.raises(ValueError, match=r"results\['m'\] has no recall@K for K in \[8\]"):
        plot_recall_at_k({"m": {1: 0.5}}, ks=[1, 8])
    with pytest.raises(ValueError, match="ks must be >= 1"):
        plot_recall_at_k({"m": {1: 0.5}}, ks=[0])


def test_draw_reranking_shows_both_orders_with_relevance(tmp_path: Path) -> None:
    gallery = _flat_images(6)
    before, after = [4, 1, 3, 0], [1, 3, 4, 0]
    path = tmp_path / "rerank.png"
    fig = draw_reranking(
        gallery[5, 0], gallery, before, after, relevant=[1, 3], k=3, title="one query", path=path
    )
    assert _saved(path)
    assert fig.get_suptitle() == "one query"
    axes = np.array(fig.axes).reshape(2, 4)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["global", "reranked"]
    for row, ranking in enumerate((before, after)):
        assert _drawn_value(axes[row, 0]) == pytest.approx(50 / 255)
        for col, g in enumerate(ranking[:3], start=1):
            assert _drawn_value(axes[row, col]) == pytest.approx(10 * g / 255)
            assert _frame(axes[row, col]) == to_rgba("green" if g in (1, 3) else "red")
    assert [ax.get_title() for ax in axes[1, 1:]] == ["#1 (was #2)", "#2 (was #3)", "#3 (was #1)"]
    mask = torch.zeros(6, dtype=torch.bool)
    mask[4] = True
    fig = draw_reranking(gallery[5], gallery, before, after, relevant=mask, k=10)  # k capped at the depth
    assert len(fig.axes) == 2 * 5
    assert _frame(fig.axes[1]) == to_rgba("green")


def test_draw_reranking_rejects_bad_input() -> None:
    gallery = torch.rand(4, 3, 5, 5)
    with pytest.raises(ValueError, match=r"after must lie in \[0, 4\)"):
        draw_reranking(gallery[0], gallery, [1, 2], [2, 9])
    with pytest.raises(ValueError, match="before must be 1-D"):
        draw_reranking(gallery[0], gallery, [[1, 2]], [2, 1])
    with pytest.raises(TypeError, match="before must hold integer gallery indices"):
        draw_reranking(gallery[0], gallery, [1.0, 2.0], [2, 1])
    with pytest.raises(ValueError, match="query_image must be one image"):
        draw_reranking(gallery, gallery, [1, 2], [2, 1])
    with pytest.raises(ValueError, match=r"a bool relevant must be \(4,\)"):
        draw_reranking(gallery[0], gallery, [1, 2], [2, 1], relevant=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="before and after must not be empty"):
        draw_reranking(gallery[0], gallery, torch.empty(0, dtype=torch.long), [2, 1])


def test_plot_set_embedding_from_steps(tmp_path: Path) -> None:
    steps = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    path = tmp_path / "set.png"
    fig = plot_set_embedding(torch.rand(3, 1, 6, 6), steps=steps, path=path)
    assert _saved(path)
    assert len(fig.axes) == 1 + 3  # the curve, then a thumbnail per image
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [0, 2**-0.5, 1], atol=1e-6)
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == "final embedding"
    references = {"x axis": torch.tensor([1.0, 0.0]), "minus y": np.array([0.0, -3.0])}
    fig = plot_set_embedding(steps=steps, references=references, title="two references")
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_title() == "two references"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["x axis", "minus y"]
    # cos(steps[t], reference) by hand: steps are (1, 0), (1, 1) / sqrt 2, (0, 1) in direction
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [1, 2**-0.5, 0], atol=1e-6)
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), [0, -(2**-0.5), -1], atol=1e-6)


def test_plot_set_embedding_builds_mile_embeddings_image_by_image() -> None:
    from tests.test_mile import tiny_mile

    model = tiny_mile()
    images = torch.randn(3, 3, 28, 28)
    fig = plot_set_embedding(images, model=model)
    with torch.no_grad():
        expected = model(images[None], return_steps=True)[0]  # the batch forward, not the incremental API
    cosine = torch.nn.functional.cosine_similarity(expected, expected[-1:], dim=1)
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), cosine.numpy(), rtol=1e-4, atol=1e-5)
    assert len(fig.axes) == 4


def test_plot_set_embedding_rejects_bad_input() -> None:
    steps = torch.randn(3, 4)
    with pytest.raises(ValueError, match="pass exactly one of model"):
        plot_set_embedding(torch.rand(3, 3, 6, 6))
    with pytest.raises(ValueError, match="images are required with model"):
        plot_set_embedding(model=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"steps must be \(N, D\)"):
        plot_set_embedding(steps=steps[0])
    with pytest.raises(ValueError, match=r"references\['b'\] must be \(4,\), got shape \(3,\)"):
        plot_set_embedding(steps=steps, references={"a": torch.randn(4), "b": torch.randn(3)})
    with pytest.raises(ValueError, match=r"references\['a'\] contains NaN or inf values \(first at row 2\)"):
        plot_set_embedding(steps=steps, references={"a": torch.tensor([0.0, 1.0, float("nan"), 0.0])})
    for bad in ({}, torch.randn(4)):
        with pytest.raises(ValueError, match="references must be a non-empty mapping"):
            plot_set_embedding(steps=steps, references=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="images has 2 images but steps has 3 rows"):
        plot_set_embedding(torch.rand(2, 3, 6, 6), steps=steps)
    with pytest.raises(ValueError, match=r"steps contains NaN or inf values \(first at row 1\)"):
        plot_set_embedding(steps=steps.index_fill(0, torch.tensor([1]), float("inf")))


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    calls = [
        lambda: draw_neighbours(torch.rand(1, 4, 4), torch.rand(2, 4, 4), [[1]]),
        lambda: plot_recall_at_k({"m": {1: 0.5}}),
        lambda: draw_reranking(torch.rand(4, 4), torch.rand(2, 4, 4), [0], [0]),
        lambda: plot_set_embedding(steps=torch.randn(2, 3)),
    ]
    for call in calls:
        with pytest.raises(ImportError, match=r"needs matplotlib: pip install objretrieval\[examples\]"):
            call()
