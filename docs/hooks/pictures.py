"""The docs' pictures, drawn by ``objretrieval.visualization`` on the embedded digits at every docs build.

mkdocs runs :func:`on_pre_build` (``hooks:`` in mkdocs.yml), so a page never shows a picture of older code;
the files land in ``docs/images/generated/`` (git-ignored). ``python docs/hooks/pictures.py`` draws them too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "images" / "generated"


def draw(out: Path = OUT) -> list[Path]:
    """Draw every picture into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    sys.path.insert(0, str(ROOT / "examples"))
    from digits import load, small_cnn

    from objretrieval import RetrievalEvaluator, knn
    from objretrieval.visualization import draw_neighbours, plot_recall_at_k

    out.mkdir(parents=True, exist_ok=True)
    images, labels = load(seen=False)
    pixels = images.flatten(1)
    torch.manual_seed(0)
    with torch.no_grad():
        untrained = small_cnn()(images)
    queries = torch.tensor([0, 40, 80, 120, 160])
    found = knn(pixels[queries], pixels, k=7, exclude=queries)
    paths = [out / "neighbours.png", out / "recall_at_k.png"]
    draw_neighbours(
        images[queries],
        images,
        found,
        query_labels=labels[queries],
        gallery_labels=labels,
        title="Unseen digits: nearest raw-pixel neighbours (green: same digit)",
        path=paths[0],
    )
    names = [f"recall@{k}" for k in (1, 2, 4, 8, 16)]
    evaluator = RetrievalEvaluator(names)
    results: dict[str, Any] = {
        "raw pixels": evaluator(pixels, labels),
        "untrained CNN": evaluator(untrained, labels),
    }
    plot_recall_at_k(results, title="Leave-one-out Recall@K on the unseen digits", path=paths[1])
    import matplotlib.pyplot as plt

    plt.close("all")
    return paths


def on_pre_build(config: Any, **kwargs: Any) -> None:
    draw(Path(config["docs_dir"]) / "images" / "generated")


if __name__ == "__main__":
    for path in draw():
        print(path)
