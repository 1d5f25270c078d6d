"""MIC's network, official checkpoints, interclass clustering, cluster sampler and two-task training steps."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from objretrieval import create_model
from objretrieval.losses import MarginLoss
from objretrieval.metrics import normalized_mutual_info
from objretrieval.miners import DistanceWeightedMiner
from objretrieval.models import MIC, CheckpointMismatchError, convert_official_mic
from objretrieval.samplers import ClusterBatchSampler, MPerClassSampler, PseudoLabelledDataset
from objretrieval.training import (
    MIC_PRESETS,
    InterclassClusters,
    MICTraining,
    class_centred,
    cluster_labels,
)


def _tiny(**kwargs: object) -> MIC:
    model = create_model("mic_resnet10", **kwargs)
    assert isinstance(model, MIC)
    return model


def _official_state(model: MIC) -> dict[str, torch.Tensor]:
    """A model's weights in the official layout: model.*, model.last_linear.{Class,Shared}, layer_blocks aliases."""
    state = {f"model.{k}": v.clone() for k, v in model.trunk.state_dict().items()}
    for task, head in (("Class", model.class_head), ("Shared", model.shared_head)):
        for kind, value in head.state_dict().items():
            state[f"model.last_linear.{task}.{kind}"] = value.clone()
    for i in range(4):
        prefix = f"model.layer{i + 1}."
        state.update(
            {f"layer_blocks.{i}.{k[len(prefix) :]}": v for k, v in state.items() if k.startswith(prefix)}
        )
    return state


def _randomise(model: nn.Module, seed: int) -> None:
    """Random weights and BatchNorm statistics, so that frozen statistics matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(
                    torch.rand(tensor.shape, generator=g) + 0.5
                    if "running_var" in name
                    else 0.1 * torch.randn(tensor.shape, generator=g)
                )


class OfficialNetwork(nn.Module):
    """MIC's ``NetworkSuperClass_ResNet50`` forward, written out on a torchvision ResNet (the reference)."""

    def __init__(self, resnet: torchvision.models.ResNet, class_dim: int, shared_dim: int) -> None:
        super().__init__()
        self.model = resnet
        self.model.last_linear = nn.ModuleDict(
            {
                "Class": nn.Linear(resnet.fc.in_features, class_dim),
                "Shared": nn.Linear(resnet.fc.in_features, shared_dim),
            }
        )
        del self.model.fc
        # the stages again, as the official network keeps them: its state dict lists them twice
        self.layer_blocks = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])

    def forward(self, x: torch.Tensor, is_init_cluster_generation: bool = False) -> dict[str, torch.Tensor]:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        if is_init_cluster_generation:
            x = F.avg_pool2d(m.layer1(x), 18, 12)
            return {"init": F.normalize(x.view(x.size(0), -1))}
        for layer in self.layer_blocks:
            x = layer(x)
        x = m.avgpool(x).view(x.size(0), -1)
        out = {"Last": x}
        for task in ("Class", "Shared"):
            out[task] = F.normalize(m.last_linear[task](x), dim=-1)
        return out


def _reference_resnet10() -> torchvision.models.ResNet:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1])


def test_outputs_match_the_official_forward_on_converted_weights() -> None:
    reference = OfficialNetwork(_reference_resnet10(), 64, 64)
    _randomise(reference, 0)
    reference.eval()
    state = reference.state_dict()
    assert any(k.startswith("layer_blocks.3.") for k in state)
    model = create_model("mic_resnet10", checkpoint={"state_dict": state})
    model.train()  # BatchNorm statistics stay frozen in training mode
    images = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected = reference(images)
        out = model(images)
        torch.testing.assert_close(out.pooled, expected["Last"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.class_embedding, expected["Class"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.shared_embedding, expected["Shared"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.embed(images), expected["Class"], rtol=1e-5, atol=1e-5)
        init = model.cluster_features(images)
        torch.testing.assert_close(init, reference(images, is_init_cluster_generation=True)["init"])
    assert init.shape == (3, 64 * 4 * 4)  # 56x56 layer1 map pooled 18/12 -> 4x4


def test_batchnorm_statistics_frozen_affine_trained() -> None:
    model = _tiny()
    model.train()
    bn = model.trunk.layer2[0].bn1
    before = bn.running_mean.clone()
    out = model(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert torch.equal(bn.running_mean, before)
    out.class_embedding.sum().backward()
    assert bn.weight.requires_grad and bn.weight.grad is not None
    # freeze_bn=False trains the statistics (for a network trained from scratch)
    free = _tiny(freeze_bn=False).train()
    stats = free.trunk.layer2[0].bn1.running_mean.clone()
    free(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert not torch.equal(free.trunk.layer2[0].bn1.running_mean, stats)


def test_cluster_features_error_on_small_maps() -> None:
    model = _tiny().eval()
    with pytest.raises(ValueError, match="smaller than the cluster_pool kernel 18"):
        model.cluster_features(torch.randn(1, 3, 64, 64))  # layer1 is 16x16
    small = _tiny(cluster_pool=(6, 3)).eval()
    assert small.cluster_features(torch.randn(2, 3, 64, 64)).shape == (2, 64 * 4 * 4)
    with pytest.raises(ValueError, match="images must be"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="class_dim"):
        _tiny(class_dim=0)


def test_official_checkpoint_file_with_arguments_and_log(tmp_path: Path) -> None:
    source = _tiny()
    _randomise(source, 1)
    path = tmp_path / "checkpoint_Class.pth.tar"
    opt = argparse.Namespace(dataset="cub200", device=torch.device("cpu"), tau=[50], embed_sizes=[64, 64])
    progress = {"train": {"Epochs": [0, 1], "Train Loss": [np.float64(0.41), np.float32(0.38)]}}
    torch.save({"state_dict": _official_state(source), "opt": opt, "progress": progress}, path)
    loaded = create_model("mic_resnet10", checkpoint=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_official_checkpoint_pickled_under_numpy_1(tmp_path: Path) -> None:
    """The official runs pickled their metric log with numpy 1, whose scalars live in ``numpy.core``."""
    source = _tiny()
    buffer = io.BytesIO()
    progress = {"val": {"Recall @ 1": [np.float64(0.61)]}}
    checkpoint = {
        "state_dict": _official_state(source),
        "opt": argparse.Namespace(lr=1e-5),
        "progress": progress,
    }
    torch.save(checkpoint, buffer, _use_new_zipfile_serialization=False)  # protocol-2 pickle: names as text
    data = buffer.getvalue()
    if b"numpy._core.multiarray" in data:  # written by numpy 2: rename as numpy 1 wrote it
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    path = tmp_path / "checkpoint_Class.pth.tar"
    path.write_bytes(data)
    loaded = create_model("mic_resnet10", checkpoint=path)
    assert torch.equal(loaded.class_head.weight, source.class_head.weight)


def test_official_conversion_errors() -> None:
    state = _official_state(_tiny())
    with pytest.raises(KeyError, match=r"no model\.last_linear\.Class\.weight"):
        convert_official_mic({k: v for k, v in state.items() if "Class" not in k})
    with pytest.raises(KeyError, match="unexpected keys"):
        convert_official_mic({**state, "criterion.beta": torch.ones(3)})
    with pytest.raises((CheckpointMismatchError, ValueError), match="shared_head"):
        create_model("mic_resnet10", checkpoint={"state_dict": state}, shared_dim=32)


def test_class_centring_matches_the_official_loop() -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(40, 6, generator=g)
    classes = torch.randint(0, 5, (40,), generator=g)
    classes[:5] = torch.arange(5)
    x, c = features.numpy().copy(), classes.numpy()
    means = np.stack([x[c == i].mean(0) for i in np.unique(c)])
    stds = np.stack([x[c == i].std(0) for i in np.unique(c)])
    expected_mean = x - means[c]
    expected_mstd = expected_mean / stds[c]
    torch.testing.assert_close(
        class_centred(features, classes), torch.from_numpy(expected_mean), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        class_centred(features, classes, "mstd"), torch.from_numpy(expected_mstd), atol=1e-4, rtol=1e-4
    )
    assert torch.equal(class_centred(features, classes, "no_norm"), features)
    # a single-image class has zero spread: 0, not the official 0/0
    single = torch.cat([classes, torch.tensor([9])])
    out = class_centred(torch.cat([features, torch.randn(1, 6)]), single, "mstd")
    assert torch.isfinite(out).all() and torch.equal(out[-1], torch.zeros(6))
    with pytest.raises(ValueError, match="class_labels"):
        class_centred(features, classes[:-1])
    with pytest.raises(ValueError, match="normalization"):
        class_centred(features, classes, "std")  # type: ignore[arg-type]


def test_clustering_recovers_what_classes_share() -> None:
    """Class-centred clustering finds a factor that cuts across classes (as MIC's shared task wants)."""
    g = torch.Generator().manual_seed(0)
    n_classes, n_styles, per = 6, 3, 30
    classes = torch.arange(n_classes).repeat_interleave(n_styles * per)
    styles = torch.arange(n_styles).repeat_interleave(per).repeat(n_classes)
    class_offset = 8.0 * torch.randn(n_classes, 16, generator=g)
    style_offset = 2.0 * torch.randn(n_styles, 16, generator=g)
    features = class_offset[classes] + style_offset[styles] + 0.1 * torch.randn(len(classes), 16, generator=g)
    raw = cluster_labels(features, n_styles, nredo=10)
    assert normalized_mutual_info(raw, styles) < 0.5  # uncentred, the classes dominate
    clusters = InterclassClusters(n_styles, nredo=10)  # one Lloyd run may merge two groups
    labels = clusters.initialise(features, classes)
    assert labels.dtype == torch.int64 and labels.shape == classes.shape
    assert normalized_mutual_info(labels, styles) > 0.99
    assert clusters.num_found == n_styles
    # re-clustering uses the embedding as it is, with the number of clusters found first
    updated = clusters.update(style_offset[styles] + 0.01 * torch.randn(len(styles), 16, generator=g))
    assert normalized_mutual_info(updated, styles) > 0.99 and clusters.labels is updated
    with pytest.raises(ValueError, match="rows but the clustered set"):
        clusters.update(torch.randn(5, 16))
    with pytest.raises(RuntimeError, match="initialise"):
        InterclassClusters(3).update(torch.randn(5, 16))


def test_recluster_schedule_follows_the_official_counter() -> None:
    for freq in (0, 1, 3):
        counter, official = 0, []
        for epoch in range(
            20
        ):  # main.py: after each epoch, re-cluster when the counter reaches the frequency
            if counter == freq:
                official.append(epoch)
                counter = 0
            else:
                counter += 1
        schedule = InterclassClusters(4, update_every=freq)
        assert [e for e in range(20) if schedule.due(e)] == official
    assert [e for e in range(12) if InterclassClusters(4).due(e)] == [3, 7, 11]


def _cluster_labels(n_clusters: int = 8, per: int = 10) -> torch.Tensor:
    return torch.arange(n_clusters).repeat_interleave(per)[
        torch.randperm(n_clusters * per, generator=torch.Generator().manual_seed(0))
    ]


def test_cluster_sampler_without_noise_is_the_m_per_class_layout() -> None:
    labels = _cluster_labels()
    sampler = ClusterBatchSampler(labels, batch_size=16, m=4, random_pick_p=0.0, seed=3)
    plain = MPerClassSampler(labels, batch_size=16, m=4, seed=3, small_classes="replace")
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        plain.set_epoch(epoch)
        pairs = list(sampler)
        assert [[i for i, _ in batch] for batch in pairs] == list(plain)
        assert all(label == int(labels[i]) for batch in pairs for i, label in batch)


def test_cluster_sampler_label_noise() -> None:
    n_clusters = 8
    labels = _cluster_labels(n_clusters, per=50)
    sampler = ClusterBatchSampler(labels, batch_size=32, m=4, random_pick_p=0.2, seed=0)
    swapped, total, counts = 0, 0, np.zeros(n_clusters)
    for epoch in range(30):
        sampler.set_epoch(epoch)
        for batch in sampler:
            slot = np.array([label for _, label in batch]).reshape(-1, 4)
            assert (slot == slot[:, :1]).all()  # m consecutive slots share their cluster's label
            assert len(np.unique(slot[:, 0])) == slot.shape[0]  # distinct clusters per batch
            for index, label in batch:
                total += 1
                if int(labels[index]) != label:
                    swapped += 1
                    counts[int(labels[index])] += 1
    # a swapped-in image comes from a uniform cluster, the slot's own one included
    expected = 0.2 * (1 - 1 / n_clusters)
    assert abs(swapped / total - expected) < 4 * np.sqrt(expected * (1 - expected) / total)
    assert counts.min() > 0.7 * counts.mean()
    # labels can be replaced between epochs
    sampler.update_labels(labels + 10)
    assert {label for batch in sampler for _, label in batch} == set(range(10, 10 + n_clusters))
    with pytest.raises(ValueError, match="random_pick_p"):
        ClusterBatchSampler(labels, batch_size=32, random_pick_p=1.5)
    with pytest.raises(ValueError, match="distinct"):
        ClusterBatchSampler(labels, batch_size=64, m=4)  # 16 clusters per batch, 8 exist


def test_cluster_sampler_through_a_dataloader() -> None:
    labels = _cluster_labels()
    images = torch.arange(len(labels), dtype=torch.float32)[:, None]
    dataset = PseudoLabelledDataset(TensorDataset(images, torch.zeros(len(labels))))
    sampler = ClusterBatchSampler(labels, batch_size=8, m=2, random_pick_p=0.5, seed=1)
    batches = list(DataLoader(dataset, batch_sampler=sampler))
    assert len(batches) == len(sampler)
    for (got_images, got_labels), pairs in zip(batches, list(sampler), strict=True):
        assert got_images[:, 0].long().tolist() == [i for i, _ in pairs]
        assert got_labels.tolist() == [label for _, label in pairs]
    with pytest.raises(TypeError, match="index, label"):
        dataset[3]  # type: ignore[index]
    ranks = [ClusterBatchSampler(labels, batch_size=8, m=2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert len(list(ranks[0])) == len(list(ranks[1])) == -(-len(sampler) // 2)


def _training(**kwargs: object) -> MICTraining:
    torch.manual_seed(0)
    return MICTraining(_tiny(), 4, 3, generator=torch.Generator().manual_seed(0), **kwargs)  # type: ignore[arg-type]


def test_param_groups_are_mics_three_groups() -> None:
    mic = _training()
    groups = mic.param_groups()
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-5, 4e-4), (5e-4, 0.0), (1e-5, 1e-6)]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in mic.parameters() if p.requires_grad}
    assert {id(p) for p in groups[1]["params"]} == {id(mic.class_loss.beta), id(mic.shared_loss.beta)}


def test_task_loss_combines_margin_and_decorrelation() -> None:
    mic = _training(adversarial_weight=100.0)
    mic.eval()
    images, labels = torch.randn(8, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    mic.miner = DistanceWeightedMiner(generator=torch.Generator().manual_seed(5))
    out = mic.task_loss("shared", images, labels)
    with torch.no_grad():
        emb = mic.model(images)
    triplets = DistanceWeightedMiner(generator=torch.Generator().manual_seed(5))(emb.shared_embedding, labels)
    expected_metric = MarginLoss(3)(emb.shared_embedding, labels, triplets)
    expected_adv = mic.adversarial(emb.class_embedding, emb.shared_embedding)
    torch.testing.assert_close(out.metric, expected_metric)
    torch.testing.assert_close(out.loss, expected_metric + 100.0 * expected_adv)
    out.loss.backward()
    assert mic.shared_loss.beta.grad is not None and mic.class_loss.beta.grad is None
    # the encoder's decorrelation gradient is reversed: it ascends what the projection network descends
    mic.zero_grad()
    mic.task_loss("class", images, labels).adversarial.backward()
    head_grad = mic.model.shared_head.weight.grad.clone()
    mic.zero_grad()
    with torch.no_grad():
        emb = mic.model(images)
    shared = mic.model.shared_head.weight
    pooled = emb.pooled
    s = F.normalize(F.linear(pooled, shared, mic.model.shared_head.bias), dim=-1)
    plain = (
        -(F.normalize(emb.class_embedding, dim=-1) * F.normalize(mic.adversarial.regressor(s), dim=-1))
        .pow(2)
        .mean()
    )
    (grad,) = torch.autograd.grad(plain, shared)
    torch.testing.assert_close(head_grad, -grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="task"):
        mic.task_loss("both", images, labels)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels"):
        mic.task_loss("class", images, labels[:5])


@pytest.mark.parametrize(("probabilities", "stepped"), [((1.0, 0.0), "class"), ((0.0, 1.0), "shared")])
def test_training_step_takes_each_task_with_its_probability(
    probabilities: tuple[float, float], stepped: str
) -> None:
    mic = _training(task_probabilities=probabilities)
    optimizer = torch.optim.Adam(mic.param_groups(lr=1e-3, margin_lr=1e-2))
    betas = {t: getattr(mic, f"{t}_loss").beta.detach().clone() for t in ("class", "shared")}
    batch = (torch.randn(8, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1]))
    stats = mic.training_step(optimizer, batch, batch)
    skipped = "shared" if stepped == "class" else "class"
    assert getattr(stats, f"{stepped}_loss") is not None and getattr(stats, f"{skipped}_loss") is None
    assert not torch.equal(getattr(mic, f"{stepped}_loss").beta, betas[stepped])
    assert torch.equal(getattr(mic, f"{skipped}_loss").beta, betas[skipped])


def test_training_step_frequency() -> None:
    mic = _training(task_probabilities=(1.0, 0.3))
    optimizer = torch.optim.SGD(mic.parameters(), lr=0.0)
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1]))
    runs = [mic.training_step(optimizer, batch, batch) for _ in range(60)]
    assert all(r.class_loss is not None for r in runs)
    shared = sum(r.shared_loss is not None for r in runs)
    assert 8 <= shared <= 30  # Binomial(60, 0.3): mean 18, sd 3.5


def test_collect_runs_in_eval_mode_and_restores_training() -> None:
    mic = _training()
    mic.model.train()
    images = torch.randn(10, 3, 32, 32)
    got = mic.collect(mic.model.embed, DataLoader(TensorDataset(images), batch_size=4))
    assert mic.model.training
    mic.model.eval()
    torch.testing.assert_close(got, mic.model.embed(images).detach())
    with pytest.raises(ValueError, match="empty"):
        mic.collect(mic.model.embed, [])


def test_presets_follow_the_official_run_script() -> None:
    assert MIC_PRESETS["cub200"].num_clusters == 30 and MIC_PRESETS["cub200"].adversarial_weight == 2500
    assert MIC_PRESETS["sop"].task_probabilities == (1.0, 0.5) and MIC_PRESETS["sop"].milestones == (20, 35)
    mic = MICTraining.from_preset(_tiny(), "cars196", num_classes=98)
    assert mic.shared_loss.beta.shape == (150,) and mic.adversarial_weight == 500
    assert mic.class_loss.beta.shape == (98,) and mic.task_probabilities == (1.0, 0.8)
    with pytest.raises(ValueError, match="dataset"):
        MICTraining.from_preset(_tiny(), "cub", num_classes=100)


def test_official_criteria_errors() -> None:
    mic = _training()
    with pytest.raises(KeyError, match="unexpected key"):
        mic.load_official_criteria({"Class.alpha": torch.ones(4)})
    with pytest.raises(CheckpointMismatchError):
        mic.load_official_criteria({"Class.beta": torch.ones(5)})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_step_matches_cpu_forward() -> None:
    mic = _training()
    images, labels = torch.randn(8, 3, 64, 64), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    mic.eval()
    cpu = mic.model(images)
    mic.cuda()
    gpu = mic.model(images.cuda())
    torch.testing.assert_close(gpu.class_embedding.cpu(), cpu.class_embedding, rtol=1e-3, atol=1e-3)
    optimizer = torch.optim.Adam(mic.param_groups())
    stats = mic.training_step(optimizer, (images.cuda(), labels.cuda()), (images.cuda(), labels.cuda()))
    assert stats.class_loss is not None and np.isfinite(stats.class_loss)


def test_builder_arguments_that_make_no_sense() -> None:
    with pytest.raises(TypeError, match=r"'mic_resnet10' does not take an argument.*'embed_dim'"):
        create_model("mic_resnet10", embed_dim=64)  # MIC's sizes are class_dim / shared_dim
    with pytest.raises(ValueError, match="arch must be one of"):
        create_model("mic_resnet10", arch="resnet9")
    with pytest.raises(ValueError, match="shared_dim must be >= 1, got 0"):
        _tiny(shared_dim=0)
    with pytest.raises(TypeError, match="class_dim must be an int, got float"):
        _tiny(class_dim=64.0)
    with pytest.raises(ValueError, match="cluster_pool stride must be >= 1, got 0"):
        _tiny(cluster_pool=(4, 0))
    with pytest.raises(TypeError, match=r"cluster_pool must be a \(kernel, stride\) pair"):
        _tiny(cluster_pool=4)
    with pytest.raises(TypeError, match="trunk must be a ResNetTrunk"):
        MIC(nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mic_resnet50.default has no released weights.*checkpoint="):
        create_model("mic_resnet50", pretrained=True)  # input metadata only: the authors released no weights


def test_training_helpers_refuse_nonsense_arguments() -> None:
    from objretrieval.training import clip_gradients_per_tensor, cosine_schedule, ema_update

    params = [nn.Parameter(torch.ones(3))]
    params[0].grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"max_norm must lie in \(0, inf\), got -1"):
        clip_gradients_per_tensor(params, -1.0)  # would flip the gradient
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\], got 1.5"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)
    with pytest.raises(TypeError, match="epochs must be an int, got float"):
        cosine_schedule(1.0, 0.0, 2.5, 10)
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0, got -1"):
        cosine_schedule(1.0, 0.0, 2, 10, warmup_epochs=-1)
    with pytest.raises(ValueError, match=r"warmup_epochs must be in \[0, epochs=2\], got 3"):
        cosine_schedule(1.0, 0.0, 2, 10, warmup_epochs=3)
