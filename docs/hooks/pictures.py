"""The docs' pictures, drawn by ``objretrieval.visualization`` at every docs build.

mkdocs runs :func:`on_pre_build` (``hooks:`` in mkdocs.yml), so a page never shows a picture of older code;
the files land in ``docs/images/generated/`` (git-ignored). ``python docs/hooks/pictures.py`` draws them too.

- ``neighbours.png``, ``recall_at_k.png``: the embedded digits (``examples/digits.py``), raw pixels and an
  untrained CNN.
- ``ames_reranking.png``: a tiny AMES trained here (about 130 steps) with pair BCE on images of part-made
  objects (``examples/parts.py``), reranking the global shortlist of a query of *unseen* objects.
- ``mile_set_embedding.png``: a tiny MILE trained here for 100 steps with a supervised contrastive loss on
  sets of synthetic photographs (``examples/scenes.py``), embedding a set of an unseen object image by image.

Everything is seeded, and runs on one thread (faster than two on a loaded machine).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "images" / "generated"

# AMES picture: each image shows 5 of its object's 8 parts among 4 background items, one descriptor per glyph
PARTS = {"dim": 32, "rows": 9, "parts": 8, "visible": 5}
# the background items are the same in every image, training and test alike: AMES can learn to ignore them
BACKGROUND = 16
RERANK = 30  # shortlisted images that AMES re-sorts


def draw(out: Path = OUT) -> list[Path]:
    """Draw every picture into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(ROOT / "examples"))
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 on a loaded 2-core machine, and the same on any
    try:
        return [
            *_digits(out),
            _ames_reranking(out / "ames_reranking.png"),
            _mile(out / "mile_set_embedding.png"),
        ]
    finally:
        torch.set_num_threads(threads)
        plt.close("all")


def _digits(out: Path) -> list[Path]:
    from digits import load, small_cnn

    from objretrieval import RetrievalEvaluator, knn
    from objretrieval.visualization import draw_neighbours, plot_recall_at_k

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
    return paths


def _train_ames(images: Any, rng: np.random.Generator) -> Any:
    """A tiny AMES trained with pair BCE until its loss averages below 0.15 over 20 steps (at most 400)."""
    from parts import sample_pairs

    from objretrieval.losses import PairBCELoss
    from objretrieval.models import AMES

    model = AMES(PARTS["dim"], model_dim=64, num_encoder_layers=2, dim_feedforward=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss_fn, losses = PairBCELoss(), []
    model.train()
    while len(losses) < 400 and (len(losses) < 20 or np.mean(losses[-20:]) > 0.15):
        queries, database, match = sample_pairs(images.labels, 256, rng)
        loss = loss_fn(
            model(images.descriptors[queries], images.descriptors[database]), torch.from_numpy(match)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval()


def _ames_reranking(path: Path) -> Path:
    from parts import part_images, render

    from objretrieval import RetrievalEvaluator, knn
    from objretrieval.reranking import AMESScorer, rerank, score_shortlist
    from objretrieval.visualization import draw_reranking

    g = torch.Generator().manual_seed(0)
    background = F.normalize(torch.randn(BACKGROUND, PARTS["dim"], generator=g), dim=-1)
    train = part_images(300, 4, **PARTS, clutter=background, generator=g)
    test = part_images(20, 5, **PARTS, clutter=background, generator=g)  # objects unseen in training
    torch.manual_seed(0)
    model = _train_ames(train, np.random.default_rng(0))

    labels = torch.from_numpy(test.labels)
    shortlist = knn(test.global_descriptors(), k=len(labels) - 1)  # leave-one-out: every other image
    local = (test.descriptors, torch.zeros(test.descriptors.shape[:2], dtype=torch.bool))
    scorer = AMESScorer(
        model, local, local, query_descriptors=PARTS["rows"], database_descriptors=PARTS["rows"]
    )
    raw = score_shortlist(scorer, shortlist, k=RERANK)
    ranking = rerank(shortlist, raw, k=RERANK, lamb=0.0, temp=1.0)  # lamb = 0: AMES's score alone
    evaluator = RetrievalEvaluator(["map"], return_per_query=True)
    before, after = evaluator.from_ranking(shortlist.indices, labels), evaluator.from_ranking(ranking, labels)
    gain = after.per_query["map"] - before.per_query["map"]
    query = int((gain - gain.mean()).abs().argmin())  # a typical query: the gain closest to the mean gain
    pictures = torch.stack([render(test, i, tile=16) for i in range(len(labels))])
    this = f"{before.per_query['map'][query]:.2f} -> {after.per_query['map'][query]:.2f}"
    draw_reranking(
        pictures[query],
        pictures,
        shortlist.indices[query],
        ranking[query],
        relevant=labels == labels[query],
        k=8,
        title=(
            f"AMES reranking of unseen objects (green: same object). Mean AP over {len(labels)} queries: "
            f"{before['map']:.2f} global, {after['map']:.2f} reranked; this query {this}"
        ),
        path=path,
    )
    return path


def _photographs(generator: torch.Generator, objects: int, photos: int) -> torch.Tensor:
    """(objects, photos, 3, 56, 56) photographs of new synthetic objects, roughly zero-mean."""
    from scenes import draw_scene, photograph

    scenes = [draw_scene(generator, 56, 56) for _ in range(objects)]
    views = [torch.stack([photograph(s, generator, 0.6) for _ in range(photos)]) for s in scenes]
    return torch.stack(views) - 0.5


def _train_mile(photos: torch.Tensor, generator: torch.Generator, steps: int = 100) -> Any:
    """A tiny MILE trained with SupCon: two disjoint 3-image sets of an object are positives."""
    from objretrieval import create_model
    from objretrieval.losses import SupConLoss

    # init_values=1: timm's DINOv2 LayerScale of 1e-5 leaves a random ViT's class token nearly constant
    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 56, "init_values": 1.0}
    model = create_model("mile_vits", backbone_kwargs=tiny, lora_r=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = SupConLoss()
    model.train()
    for _ in range(steps):
        objects = torch.randperm(len(photos), generator=generator)[:16]
        order = torch.stack([torch.randperm(photos.shape[1], generator=generator) for _ in objects])
        sets = torch.cat([photos[objects[:, None], order[:, :3]], photos[objects[:, None], order[:, 3:6]]])
        loss = loss_fn(model(sets), torch.cat([objects, objects]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def _mile(path: Path) -> Path:
    from objretrieval.visualization import plot_set_embedding

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = _train_mile(_photographs(g, 48, 6), g)
    photos = _photographs(g, 3, 10)  # objects A, B, C, unseen in training
    with torch.no_grad():
        references = model(photos[:, 6:])  # each object's embedding from 4 other photos
    plot_set_embedding(
        photos[0, :6],  # fed to the model image by image (MILE.update); min-max scaled for the thumbnails
        model=model,
        references={
            "object A, 4 other photos": references[0],
            "object B, 4 photos": references[1],
            "object C, 4 photos": references[2],
        },
        title="MILE embedding of object A's photos, image by image",
        path=path,
    )
    return path


def on_pre_build(config: Any, **kwargs: Any) -> None:
    draw(Path(config["docs_dir"]) / "images" / "generated")


if __name__ == "__main__":
    for path in draw():
        print(path)
