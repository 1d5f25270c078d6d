"""Write the example notebooks (stored without outputs): ``uv run python examples/notebooks/_build.py``.

Each notebook is a list of cells here, markdown (``md``) or code (``code``), so that the notebooks' text
lives in reviewable Python; the test suite executes the written ``.ipynb`` files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
COLAB = "https://colab.research.google.com/github/org/objretrieval/blob/main/examples/notebooks"
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"

INSTALL = """\
import importlib.util

# installs objretrieval only where it is missing (e.g. on Colab); a no-op in a project checkout
if importlib.util.find_spec("objretrieval") is None:
    %pip install --quiet "objretrieval[examples]"  # the examples extra: scikit-learn and matplotlib"""

EXAMPLES_PATH = """\
import sys
from pathlib import Path

import torch

# the small data helpers of examples/ (digits.py, scenes.py): found in a checkout, fetched elsewhere (Colab)
folders = [p / sub for p in (Path.cwd(), *Path.cwd().parents) for sub in (".", "examples")]
examples = next((f for f in folders if (f / "digits.py").exists()), None)
if examples is None:
    import urllib.request

    examples = Path.cwd()
    for helper in ("digits.py", "scenes.py"):
        urllib.request.urlretrieve(f"https://raw.githubusercontent.com/org/objretrieval/main/examples/{helper}", helper)
sys.path.insert(0, str(examples))
torch.manual_seed(0)
torch.set_num_threads(1)"""


def md(text: str) -> dict:
    return new_markdown_cell(text.strip())


def code(text: str) -> dict:
    return new_code_cell(text.strip())


def header(name: str, title: str, summary: str) -> list[dict]:
    badge = BADGE.format(url=f"{COLAB}/{name}.ipynb")
    return [md(f"# {title}\n\n{badge}\n\n{summary.strip()}"), code(INSTALL)]


NOTEBOOKS: dict[str, list[dict]] = {}

NOTEBOOKS["quickstart"] = [
    *header(
        "quickstart",
        "Quickstart: a loss, a sampler and RetrievalMetrics",
        """
Train a small CNN on handwritten digits 0-4 (scikit-learn's bundled dataset) with the contextual loss and
class-balanced batches, then evaluate zero-shot retrieval on random views (rotated, scaled, shifted) of the
unseen digits 5-9. A shortened version of `examples/quickstart.py`.
""",
    ),
    code(EXAMPLES_PATH),
    md("""
## Data
`zero_shot_split` gives the training digits as they are and the unseen digits as random views (16x16 here).
"""),
    code("""
from digits import random_views, zero_shot_split

train_images, train_labels, test_views, test_labels = zero_shot_split(seed=0, size=16)
print(train_images.shape, test_views.shape)
"""),
    md("""
## Model, loss and sampler
The loss sees a projection head; retrieval uses the features below it (they transfer to unseen classes).
`MPerClassSampler` yields batches of `m` images of each class.
"""),
    code("""
from torch import nn

from objretrieval.losses import ContextualLoss
from objretrieval.samplers import MPerClassSampler


def block(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


features = nn.Sequential(
    *block(1, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(),
)
model = nn.Sequential(features, nn.Linear(128, 64))
loss_fn = ContextualLoss()
sampler = MPerClassSampler(train_labels, batch_size=5 * 16, m=16, seed=0)
print(loss_fn, len(sampler), "batches per epoch")
"""),
    md("""
## Evaluation with `RetrievalMetrics`
`update` per batch, `compute` once: leave-one-out retrieval over the unseen digits.
"""),
    code("""
from objretrieval import RetrievalMetrics

METRICS = ["recall@1", "recall@4", "map@r"]


@torch.no_grad()
def evaluate(net):
    net.eval()
    metrics = RetrievalMetrics(METRICS)
    for i in range(0, len(test_views), 256):
        metrics.update(net(test_views[i : i + 256]), test_labels[i : i + 256])
    return metrics.compute().metrics


before = evaluate(features)
before
"""),
    md("## Training\nA few epochs (the script trains 30)."),
    code("""
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
augment = torch.Generator().manual_seed(0)
for epoch in range(4):
    sampler.set_epoch(epoch)
    model.train()
    for batch in sampler:
        index = torch.tensor(batch)
        loss = loss_fn(model(random_views(train_images[index], augment)), train_labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch}: loss {loss.item():.4f}")
"""),
    code("""
after = evaluate(features)
for name in METRICS:
    print(f"{name:>10}: untrained {100 * before[name]:5.1f}   trained {100 * after[name]:5.1f}")
"""),
    md("Training on digits 0-4 improves retrieval of the unseen digits 5-9:"),
    code('assert after["map@r"] > before["map@r"] and after["recall@1"] > before["recall@1"]'),
]

NOTEBOOKS["ames_reranking"] = [
    *header(
        "ames_reranking",
        "AMES reranking: from local descriptors to revisited mAP",
        """
Rerank a global kNN shortlist with AMES on a tiny synthetic landmark dataset (from `examples/scenes.py`):
extract local descriptors into an AMES-layout file, shortlist by global descriptor, project the database
once, rerank, and score revisited Medium / Hard mAP. Offline, the backbone is a tiny random ViT and AMES has
random weights, so the numbers only show the pipeline; `examples/ames_revisited.py` reproduces the paper
with the released weights and descriptor files.
""",
    ),
    code(EXAMPLES_PATH),
    md("""
## A tiny landmark dataset
Each landmark is photographed as two easy views, one hard view and one junk view (mostly hidden), plus
distractor images; the queries are further views. The ground truth has the revisited layout.
"""),
    code("""
from scenes import draw_scene, photograph

H, W = 56, 70
g = torch.Generator().manual_seed(0)
scenes = [draw_scene(g, H, W) for _ in range(6)]
database, gnd = [], []
for scene in scenes:
    ids = {"easy": [], "hard": [], "junk": []}
    for kind, strength in (("easy", 0.3), ("easy", 0.5), ("hard", 1.0), ("junk", 1.0)):
        view = photograph(scene, g, strength)
        if kind == "junk":
            view[:, :, : W * 3 // 4] = draw_scene(g, H, W)[:, :, : W * 3 // 4]
        ids[kind].append(len(database))
        database.append(view)
    gnd.append(ids)
database += [draw_scene(g, H, W) for _ in range(8)]
queries = [photograph(scene, g, 0.2) for scene in scenes]
print(len(queries), "queries,", len(database), "database images")
"""),
    md("""
## Local descriptors in AMES's file layout
`DINOv2LocalExtractor` takes a timm ViT name (the default is DINOv2 ViT-B/14 with registers) or a built
ViT: here a one-block random one. `extract_to_store` writes each image's `topk` rows of `5 + D` values to a
`DescriptorStore` file and returns the global descriptors (with a progress bar from 10,000 images on).
"""),
    code("""
import tempfile

import timm

from objretrieval.descriptors import DescriptorStore, DINOv2LocalExtractor, extract_to_store

vit = timm.create_model(
    "vit_small_patch14_reg4_dinov2", pretrained=False, depth=1, embed_dim=32, num_heads=2,
    dynamic_img_size=True,
)
extractor = DINOv2LocalExtractor(vit, topk=16)
out_dir = Path(tempfile.mkdtemp())
q_global = extract_to_store(extractor, queries, out_dir / "query_local.h5")
db_global = extract_to_store(extractor, database, out_dir / "db_local.h5")
q_global.shape
"""),
    md("## Global shortlist and its revisited mAP"),
    code("""
from objretrieval import knn
from objretrieval.metrics import revisited_map

shortlist = knn(q_global, db_global, k=len(database))
baseline = revisited_map(shortlist.indices, gnd)
print(f"global only: medium mAP {100 * baseline.medium.map:.2f}, hard mAP {100 * baseline.hard.map:.2f}")
"""),
    md("""
## Rerank with AMES
`DatabaseCache.build` projects the database once; `AMESScorer` scores query/candidate pairs and
`rerank_revisited` reranks the top 8 of each shortlist, sweeping the fusion
`lamb * global + (1 - lamb) * sigmoid(temp * logit)`: `lamb` = 0 (AMES alone), 0.5, the model's default
and 1 (global alone).
"""),
    code("""
from objretrieval import create_model
from objretrieval.reranking import AMESScorer, DatabaseCache, rerank_revisited

model = create_model("dinov2_ames", local_dim=vit.num_features).eval()
with DescriptorStore(out_dir / "query_local.h5") as q_store, DescriptorStore(out_dir / "db_local.h5") as db:
    cache = DatabaseCache.build(model, db, max_descriptors=16)
    scorer = AMESScorer(model, q_store, cache, query_descriptors=16)
    lamb, temp = model.fusion  # the authors' values for this model
    result = rerank_revisited(scorer, shortlist, gnd, top_k=(8,), lamb=[0.0, 0.5, lamb, 1.0], temp=[temp])
print(result.summary())
"""),
    md("""
With random weights AMES's scores carry no matching signal: ranked by AMES alone the mAP drops, and reranking
is not expected to help here (the released weights, loaded by `create_model("dinov2_ames", pretrained=True)`,
carry the signal). The
checks: every combination gives mAPs in [0, 1], and with `lamb = 1` the fusion is the global similarity alone,
so the reranked mAP is the global shortlist's.
"""),
    code("""
for c in result.combinations:
    assert 0.0 <= c.medium_map <= 1.0 and 0.0 <= c.hard_map <= 1.0, c
global_alone = next(c for c in result.combinations if c.lamb == 1.0)
assert abs(global_alone.medium_map - baseline.medium.map) < 1e-9
assert abs(global_alone.hard_map - baseline.hard.map) < 1e-9
"""),
    md("""
## Query 0 before and after, drawn
`draw_reranking` shows the global order (top) and the order by AMES alone (`lamb` = 0, bottom) of the Medium
run, where the query's junk views were moved out of the shortlist first; its landmark's easy and hard views
are framed green. With random weights the new order is no better; the AMES page of the docs (`docs/ames.md`)
shows a trained model reranking.
"""),
    code("""
from objretrieval.reranking import Shortlist
from objretrieval.visualization import draw_reranking

medium_shortlist = Shortlist.of(shortlist).move_to_end([ids["junk"] for ids in gnd])
ames_alone = next(c for c in result.combinations if c.lamb == 0.0)
fig = draw_reranking(
    queries[0],
    torch.stack(database),
    medium_shortlist.indices[0],
    ames_alone.rankings["medium"][0],
    relevant=gnd[0]["easy"] + gnd[0]["hard"],
    k=8,
)
assert sorted(ames_alone.rankings["medium"][0, :8].tolist()) == sorted(medium_shortlist.indices[0, :8].tolist())
"""),
]

NOTEBOOKS["mile_sets"] = [
    *header(
        "mile_sets",
        "MILE: set embeddings built image by image",
        """
MILE embeds a *set* of images of an object as one vector, and adds images one at a time: each update costs
O(1), earlier images are never recomputed. Offline the backbone is a tiny random ViT (`examples/mile_train.py`
trains one; MILE's recipe starts from DINOv2).
""",
    ),
    code(EXAMPLES_PATH),
    md("## A tiny MILE model and sets of photographs of synthetic objects"),
    code("""
from scenes import draw_scene, photograph

from objretrieval import create_model

model = create_model("mile_vits", backbone_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 56}).eval()
g = torch.Generator().manual_seed(0)
objects = [draw_scene(g, 56, 56) for _ in range(6)]
# per object: 4 query photos and 4 target photos, (objects, 4, 3, 56, 56), roughly zero-mean
query_sets = torch.stack([torch.stack([photograph(o, g, 0.3) for _ in range(4)]) for o in objects]) - 0.5
target_sets = torch.stack([torch.stack([photograph(o, g, 0.3) for _ in range(4)]) for o in objects]) - 0.5
query_sets.shape
"""),
    md("""
## Image by image
`update(latent, images)` adds the next image to each set (`latent=None` starts them). After the last image
the latent equals `model(all images)`.
"""),
    code("""
with torch.no_grad():
    latent = None
    for i in range(query_sets.shape[1]):
        latent = model.update(latent, query_sets[:, i])
    at_once = model(query_sets)
    steps = model(query_sets, return_steps=True)  # the embedding after each image, in one call
cosine = torch.nn.functional.cosine_similarity(steps, at_once[:, None], dim=-1).mean(0)
print("cosine of the embedding after each image to the final one:", [round(c, 3) for c in cosine.tolist()])
print("incremental vs all at once, max difference:", (latent - at_once).abs().max().item())
"""),
    md("""
## Retrieval of sets
Each query set retrieves the target sets of the same objects (`RetrievalEvaluator` in query/gallery mode).
"""),
    code("""
from objretrieval import RetrievalEvaluator

labels = torch.arange(len(objects))
with torch.no_grad():
    targets = model(target_sets)
result = RetrievalEvaluator(["recall@1", "map@r"])(at_once, labels, targets, labels)
result.metrics
"""),
    code("""
torch.testing.assert_close(latent, at_once, rtol=1e-4, atol=1e-5)
torch.testing.assert_close(steps[:, -1], at_once)
assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
"""),
]

NOTEBOOKS["avsl_explanations"] = [
    *header(
        "avsl_explanations",
        "AVSL: a pairwise similarity, and why two images match",
        """
AVSL compares two images through a graph of attribute nodes at several levels of a CNN. Train a tiny AVSL on
digits 0-4 for a little while, rank unseen digits by the AVSL distance, and draw which attributes made a query
and its nearest neighbour similar. A shortened `examples/avsl_train.py`.
""",
    ),
    code(EXAMPLES_PATH),
    code("""
import torch.nn.functional as F
from digits import random_views, zero_shot_split

from objretrieval import create_model
from objretrieval.losses import AVSLProxyAnchorLoss
from objretrieval.models import AVSLFeatures, AVSLScorer
from objretrieval.samplers import MPerClassSampler

train_images, train_labels, test_views, test_labels = zero_shot_split(seed=0, size=16)
test_views, test_labels = test_views[:300], test_labels[:300]


def as_rgb(images):  # 64x64: the last level's maps are 2x2, so every node has several positions
    return (F.interpolate(images, size=64, mode="bilinear").expand(-1, 3, -1, -1) - 0.25) / 0.4


model = create_model("avsl_resnet10", freeze_bn=False)
loss_fn = AVSLProxyAnchorLoss(num_classes=5, embed_dim=model.embed_dim, level_weights=(1.0, 4.0, 4.0))
"""),
    md("""
## Training
AVSL's Proxy-Anchor losses, one per level plus the propagated distance (a few steps here).
"""),
    code("""
import itertools

optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=1e-3, weight_decay=1e-4)
sampler = MPerClassSampler(train_labels, batch_size=60, m=12, seed=0)
augment = torch.Generator().manual_seed(0)
model.train()
for batch in itertools.islice(sampler, 8):  # a few steps (the script trains 8 epochs)
    index = torch.tensor(batch)
    out = loss_fn(model, model(as_rgb(random_views(train_images[index], augment))), train_labels[index])
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
print(f"loss {out.loss.item():.3f}")
"""),
    md("""
## Ranking by the AVSL distance
The distance is pairwise (not an embedding kNN): `RetrievalEvaluator.from_scorer` evaluates it in blocks.
"""),
    code("""
from objretrieval import RetrievalEvaluator
from objretrieval.search import pairwise_knn

model.eval()
with torch.no_grad():
    feats = AVSLFeatures.cat([model(as_rgb(test_views[i : i + 150])) for i in range(0, len(test_views), 150)])
    scorer = AVSLScorer(model, feats)
    metrics = RetrievalEvaluator(["recall@1", "map@r"]).from_scorer(scorer, test_labels).metrics
    neighbour = int(pairwise_knn(AVSLScorer(model, feats.rows(slice(0, 1)), feats), k=2).indices[0, 1])
metrics
"""),
    md("""
## Explaining the best match of query 0
`model.explain` returns per-node distances and reliabilities; `draw_avsl_explanation` shows the top-level
nodes both images agree on, and the lower-level node each leans on.
"""),
    code("""
from objretrieval.visualization import draw_avsl_explanation

explanation = model.explain(as_rgb(test_views[:1]), as_rgb(test_views[neighbour : neighbour + 1]))
fig = draw_avsl_explanation(explanation, test_views[0], test_views[neighbour])
print("query digit", int(test_labels[0]), "neighbour digit", int(test_labels[neighbour]))
print("closest top-level nodes", explanation.top_nodes(0, 4).tolist())
"""),
    md("The explanation's distance is the one the ranking used:"),
    code("""
with torch.no_grad():
    pair = AVSLScorer(model, feats.rows(slice(0, 1)), feats.rows(slice(neighbour, neighbour + 1)))
    ranked = pairwise_knn(pair, k=1).scores
print(f"explanation: {explanation.distance.item():.4f}, ranking score (negated distance): {ranked.item():.4f}")
torch.testing.assert_close(-ranked.flatten(), explanation.distance.flatten())
assert len(fig.axes) > 0
"""),
]

NOTEBOOKS["mic_two_tasks"] = [
    *header(
        "mic_two_tasks",
        "MIC: the class task and the shared (interclass) task",
        """
MIC trains two heads: a class embedding on the labels, and a shared embedding on cluster pseudo-labels that
cut across classes (characteristics shared between classes). Gradient reversal decorrelates the two, and the
shared task is re-clustered during training. A shortened `examples/mic_train.py` on digits.
""",
    ),
    code(EXAMPLES_PATH),
    code("""
import torch.nn.functional as F
from digits import random_views, zero_shot_split

from objretrieval import RetrievalEvaluator, create_model
from objretrieval.metrics import normalized_mutual_info
from objretrieval.samplers import ClusterBatchSampler, MPerClassSampler
from objretrieval.training import InterclassClusters, MICTraining

train_images, train_labels, test_views, test_labels = zero_shot_split(seed=0, size=16)


def as_rgb(images):
    return (F.interpolate(images, size=32, mode="bilinear").expand(-1, 3, -1, -1) - 0.25) / 0.4


def batches(images, size=256):
    return [as_rgb(images[i : i + size]) for i in range(0, len(images), size)]


model = create_model("mic_resnet10", freeze_bn=False, cluster_pool=(3, 2))
mic = MICTraining(model, 5, 8, adversarial_weight=50.0, task_probabilities=(1.0, 0.8),
                  generator=torch.Generator().manual_seed(0))
"""),
    md("""
## The shared task's pseudo-labels
k-means on class-centred `layer1` features: the clusters are not the classes (low NMI with them).
"""),
    code("""
clusters = InterclassClusters(8)
cluster_labels = clusters.initialise(mic.collect(model.cluster_features, batches(train_images)), train_labels)
print(f"NMI(clusters, digits) = {normalized_mutual_info(cluster_labels, train_labels):.3f}")
"""),
    md("""
## Training: one step per task
`training_step` takes a class batch and a cluster batch; each task steps the optimiser in turn.
"""),
    code("""
optimizer = torch.optim.Adam(mic.param_groups(lr=1e-3, margin_lr=1e-3))
class_sampler = MPerClassSampler(train_labels, batch_size=40, m=8, seed=0)
shared_sampler = ClusterBatchSampler(cluster_labels, batch_size=40, m=5)
augment = torch.Generator().manual_seed(0)


def batch(indices, labels):
    return as_rgb(random_views(train_images[torch.tensor(indices)], augment)), labels


before = RetrievalEvaluator(["recall@1", "map@r"])(mic.collect(model.embed, batches(test_views)), test_labels).metrics
model.train()
for step, (class_indices, pairs) in enumerate(zip(class_sampler, shared_sampler, strict=False)):
    shared_indices, shared_labels = zip(*pairs, strict=True)
    stats = mic.training_step(
        optimizer,
        batch(class_indices, train_labels[torch.tensor(class_indices)]),
        batch(list(shared_indices), torch.tensor(shared_labels)),
    )
    if step == 5:  # a few steps; examples/mic_train.py trains 12 epochs
        break
print(stats)
"""),
    md("""
## Re-clustering on the shared embedding
MIC replaces the pseudo-labels with k-means on the shared embedding at fixed epochs (after epochs 3, 7 and 11
in `examples/mic_train.py`; here once, after a few steps, to show the call). Compare the new clusters' NMI
with the digits to the initial one.
"""),
    code("""
shared = mic.collect(lambda x: model(x).shared_embedding, batches(train_images))
new_labels = clusters.update(shared)
shared_sampler.update_labels(new_labels)
print("re-clustered sizes:", torch.bincount(new_labels).tolist())
print(f"NMI(new clusters, digits) = {normalized_mutual_info(new_labels, train_labels):.3f}")
"""),
    md("""
The class embedding is what retrieval uses. A few steps only show the mechanics (the script trains 12
epochs).
"""),
    code("""
after = RetrievalEvaluator(["recall@1", "map@r"])(mic.collect(model.embed, batches(test_views)), test_labels).metrics
print("class embedding on unseen digits: before", before, "after", after)
# the shared task's initial pseudo-labels cut across the classes: they carry little of the digit labels
assert normalized_mutual_info(cluster_labels, train_labels) < 0.3
assert all(0.0 <= v <= 1.0 for v in after.values())
"""),
]

NOTEBOOKS["distributed_evaluation"] = [
    *header(
        "distributed_evaluation",
        "Distributed evaluation, explained",
        """
`RetrievalMetrics` accumulates embeddings per batch; under `torch.distributed` each rank keeps only its own
rows and `compute()` (a collective) evaluates the union of all ranks' rows with a sharded exact kNN, giving
the single-process values on every rank. Multi-process runs need `torchrun`, not a notebook; here a world of
one shows the API, and the command for several processes is at the end.
""",
    ),
    code("import torch\n\ntorch.manual_seed(0)\ntorch.set_num_threads(1)"),
    md("""
## Sharded updates with padding
A `DistributedSampler` pads its last round by repeating samples. Passing the dataset `indices` makes
`RetrievalMetrics` count each item once. Below, 2 "ranks" each see half of 50 items, the second padded with
a repeat; the result equals the evaluator on the 50 items.
"""),
    code("""
from objretrieval import RetrievalEvaluator, RetrievalMetrics

x = torch.randn(50, 16)
y = torch.randint(0, 5, (50,))
shards = [torch.arange(0, 25), torch.cat([torch.arange(25, 50), torch.tensor([0])])]  # rank 1 padded
metrics = RetrievalMetrics(["recall@1", "recall@4", "map@r"])
for shard in shards:
    metrics.update(x[shard], y[shard], indices=shard)
streamed = metrics.compute().metrics
reference = RetrievalEvaluator(["recall@1", "recall@4", "map@r"])(x, y).metrics
print(streamed, reference, sep="\\n")
"""),
    md("""
## Inside a process group
With a process group initialised, `compute()` gathers over the group. A world of one (gloo) is the
single-process computation.
"""),
    code("""
import os
import tempfile

import torch.distributed as dist

store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
try:
    metrics.reset()
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = torch.arange(rank, 50, world)  # this rank's shard
    metrics.update(x[mine], y[mine], indices=mine)
    in_group = metrics.compute().metrics
finally:
    dist.destroy_process_group()
in_group
"""),
    md("""
## Several processes
`examples/ddp_train.py` trains with `DistributedDataParallel`, `MPerClassSampler` (rank-aware),
`DistributedLoss` and evaluates with `RetrievalMetrics` sharded by `DistributedSampler`:

```bash
uv run --extra examples torchrun --nproc-per-node 2 examples/ddp_train.py   # gloo on CPU, nccl on GPUs
```

Every rank calls `compute()`; rank 0 prints. The values equal one process's on the whole set.
"""),
    code("""
for name in reference:
    assert abs(streamed[name] - reference[name]) < 1e-6, name
    assert abs(in_group[name] - reference[name]) < 1e-6, name
"""),
]

NOTEBOOKS["from_pml"] = [
    *header(
        "from_pml",
        "Coming from pytorch-metric-learning",
        """
A PML loss, miner and `AccuracyCalculator` next to objretrieval's, on the same inputs, giving the same numbers.
Our losses work on similarities (cosine by default), and accept PML's mined tuples `(a, p, n)` and
`(a1, p, a2, n)` as they are.
""",
    ),
    code("""
if importlib.util.find_spec("pytorch_metric_learning") is None:
    %pip install --quiet pytorch-metric-learning
"""),
    code("""
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from objretrieval import RetrievalEvaluator
from objretrieval.losses import MultiSimilarityLoss, TripletMarginLoss
from objretrieval.miners import MultiSimilarityMiner

torch.manual_seed(0)
labels = torch.arange(4).repeat_interleave(5)
x = torch.randn(4, 8, dtype=torch.float64)[labels] + torch.randn(20, 8, dtype=torch.float64)
"""),
    md("""
## A loss
PML's `MultiSimilarityLoss(alpha, beta, base)` is ours with the same arguments.
"""),
    code("""
ours = MultiSimilarityLoss(2.0, 50.0, 0.5)(x, labels)
theirs = pml_losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)(x, labels)
print(ours.item(), theirs.item())
"""),
    md("""
## A miner, and PML's tuples given to our loss
`MultiSimilarityMiner(epsilon)` mines the same pairs; PML's `(a1, p, a2, n)` can be passed straight to our
loss. `TripletMarginLoss(margin)` on PML's mined triplets equals PML's loss on them.
"""),
    code("""
pml_pairs = pml_miners.MultiSimilarityMiner(epsilon=0.1)(x, labels)
our_pairs = MultiSimilarityMiner(epsilon=0.1)(x, labels)
mined_ours = MultiSimilarityLoss(2.0, 50.0, 0.5)(x, labels, our_pairs)
mined_pml = pml_losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)(x, labels, pml_pairs)
tuples_into_ours = MultiSimilarityLoss(2.0, 50.0, 0.5)(x, labels, pml_pairs)

triplets = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="hard")(x, labels)
triplet_ours = TripletMarginLoss(margin=0.1)(x, labels, triplets)
triplet_pml = pml_losses.TripletMarginLoss(margin=0.1)(x, labels, triplets)
print(mined_ours.item(), mined_pml.item(), tuples_into_ours.item())
print(triplet_ours.item(), triplet_pml.item())
"""),
    md("""
## `AccuracyCalculator` and `RetrievalEvaluator`
PML's `precision_at_1`, `r_precision` and `mean_average_precision_at_r` are our `precision@1`, `r_precision`
and `map@r` (leave-one-out when the query set is the reference set). PML's calculator ranks by exact L2
distance on the raw embeddings, our evaluator by cosine unless told: `metric="l2"` gives PML's ranking.
"""),
    code("""
names = {"precision@1": "precision_at_1", "r_precision": "r_precision", "map@r": "mean_average_precision_at_r"}
calculator = AccuracyCalculator(include=tuple(names.values()), k="max_bin_count", device=torch.device("cpu"))
pml_acc = calculator.get_accuracy(x.float(), labels)
our_acc = RetrievalEvaluator(list(names), metric="l2")(x.float(), labels).metrics
for ours_name, pml_name in names.items():
    print(f"{ours_name:>12} {our_acc[ours_name]:.6f}   {pml_name} {pml_acc[pml_name]:.6f}")
"""),
    md("The same numbers:"),
    code("""
torch.testing.assert_close(ours, theirs)
torch.testing.assert_close(mined_ours, mined_pml)
torch.testing.assert_close(tuples_into_ours, mined_pml)
torch.testing.assert_close(triplet_ours, triplet_pml)
for ours_name, pml_name in names.items():
    assert abs(our_acc[ours_name] - pml_acc[pml_name]) < 1e-6, ours_name
"""),
]


def write(folder: Path = HERE) -> list[Path]:
    """Write every notebook into ``folder``; return their paths."""
    paths = []
    for name, cells in NOTEBOOKS.items():
        for i, cell in enumerate(cells):  # stable ids: rebuilding changes no line that did not change
            cell.id = f"{name}-{i}"
        nb = new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        nbformat.validate(nb)
        paths.append(folder / f"{name}.ipynb")
        nbformat.write(nb, paths[-1])
    # the notebooks' code is formatted as the project's Python is
    subprocess.run([sys.executable, "-m", "ruff", "format", "--quiet", *map(str, paths)], check=True)
    return paths


if __name__ == "__main__":
    write()
