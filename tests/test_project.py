"""Project-level checks: the docs build cleanly, the code is lint-clean, the README's main command runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run ``python *args`` with one BLAS/OpenMP thread unless the caller chose otherwise: on a loaded machine
    oversubscribed threads made an example 5x slower, and one thread costs little on an idle one."""
    threads = {name: os.environ.get(name, "1") for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env = {**os.environ, **threads, "MPLBACKEND": "Agg", "NO_MKDOCS_2_WARNING": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    result = _run("-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "search" / "index.html").is_file()
    pictures = ("neighbours.png", "recall_at_k.png", "ames_reranking.png", "mile_set_embedding.png")
    for picture in pictures:  # drawn by docs/hooks/pictures.py during the build
        assert (tmp_path / "site" / "images" / "generated" / picture).stat().st_size > 10_000


def test_ruff_is_clean() -> None:
    result = _run("-m", "ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run("-m", "ruff", "format", "--check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    result = _run("-m", "mypy", "--no-incremental")
    assert result.returncode == 0, result.stdout + result.stderr


def test_evaluation_demo_runs() -> None:
    result = _run("examples/evaluate_digits.py")
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        m = re.match(r"^(pixels|untrained CNN|PCA on seen digits)\s+(clean|random views)\s+([\d.\s]+)$", line)
        if m:
            rows[(m[1], m[2])] = [float(v) for v in m[3].split()]
    assert len(rows) == 6, result.stdout
    for values in rows.values():
        assert all(0.0 <= v <= 100.0 for v in values)
        assert values[:4] == sorted(values[:4])  # Recall@1 <= @2 <= @4 <= @8
    # random views are much harder than clean digits for an untrained network
    assert rows[("untrained CNN", "random views")][0] < rows[("untrained CNN", "clean")][0] - 20


def test_quickstart_training_improves_retrieval(tmp_path: Path) -> None:
    """The README's main command on one thread (deterministic): the trained model beats raw pixels and the
    untrained network on the unseen digits, and its Recall@8 does not fall."""
    picture = tmp_path / "neighbours.png"
    result = _run("examples/quickstart.py", "--epochs", "30", "--threads", "1", "--out", str(picture))
    assert result.returncode == 0, result.stderr
    rows = _table(result.stdout, r"^(raw pixels|untrained|trained)\s+([\d.\s]+)$")
    assert set(rows) == {"raw pixels", "untrained", "trained"}, result.stdout
    recall_1, recall_8, map_r = 0, 3, 4
    for baseline in ("raw pixels", "untrained"):
        assert rows["trained"][recall_1] > rows[baseline][recall_1], result.stdout
        assert rows["trained"][map_r] > 1.3 * rows[baseline][map_r], result.stdout
    assert rows["trained"][recall_8] >= rows["untrained"][recall_8], result.stdout
    assert picture.is_file() and picture.stat().st_size > 10_000
    assert "training" in result.stderr  # the tqdm progress bar


def _table(stdout: str, pattern: str) -> dict[str, list[float]]:
    rows = {}
    for line in stdout.splitlines():
        m = re.match(pattern, line)
        if m:
            rows[m[1].strip()] = [float(v) for v in m[2].split()]
    return rows


def test_ames_rerank_example_runs_end_to_end(tmp_path: Path) -> None:
    """Extraction (random ViT) -> descriptor files -> global shortlist -> binarized AMES rerank -> revisited mAP."""
    out = tmp_path / "ames"
    result = _run(
        "examples/ames_rerank.py",
        *("--model", "dinov2_ames_dist", "--backbone", "vit_small_patch14_reg4_dinov2"),
        *("--landmarks", "3", "--distractors", "3", "--shortlist", "10", "--out", str(out)),
        *("--image-size", "112", "140", "--topk", "100", "--query-descriptors", "80"),
    )
    assert result.returncode == 0, result.stderr
    assert "database cache: 800 bytes per image (packed codes)" in result.stdout
    # random AMES weights: the output must say that reranking cannot be expected to help, and why
    assert "the AMES weights are random (no --checkpoint)" in result.stdout
    assert "cannot be expected to beat the global shortlist" in result.stdout
    rows = _table(
        result.stdout, r"^(global only|AMES default lamb=0.35 temp=0.1|AMES best .*?)\s+([\d.]+\s+[\d.]+)$"
    )
    assert len(rows) == 3, result.stdout
    assert all(0.0 <= v <= 100.0 for values in rows.values() for v in values)
    default = rows["AMES default lamb=0.35 temp=0.1"]
    best = next(v for k, v in rows.items() if k.startswith("AMES best"))
    assert sum(best) >= sum(default)  # the sweep includes the default
    for name in ("query_local.h5", "db_local.h5", "db_codes.h5"):
        assert (out / name).is_file()
    from objretrieval.descriptors import BinaryCodeStore, DescriptorStore

    with DescriptorStore(out / "db_local.h5") as store:
        assert (len(store), store.topk, store.dim) == (15, 100, 384)
    with BinaryCodeStore(out / "db_codes.h5") as codes:
        assert len(codes) == 15 and codes.bytes_per_image == 800


def test_ames_training_example_learns(tmp_path: Path) -> None:
    """Pair BCE trains the teacher; distillation trains the binarized student, both above the untrained model."""
    result = _run("examples/ames_train.py", "--steps", "400", "--out", str(tmp_path / "train"))
    assert result.returncode == 0, result.stderr
    rows = _table(
        result.stdout, r"^(untrained teacher|teacher \(pair BCE\)|binarized student \(distil\))\s+([\d.]+)"
    )
    assert len(rows) == 3, result.stdout
    untrained, teacher, student = (
        rows["untrained teacher"][0],
        rows["teacher (pair BCE)"][0],
        rows["binarized student (distil)"][0],
    )
    assert untrained < 0.6
    assert teacher > untrained + 0.15
    assert student > untrained + 0.15


def test_ames_revisited_script_reads_the_official_data_layout(tmp_path: Path) -> None:
    """The reproduction script on a toy dataset in the authors' layout: hdf5 files, nn and gnd pickles."""
    import pickle

    import h5py
    import numpy as np
    import torch

    from objretrieval import create_model

    folder = tmp_path / "data" / "toyoxford"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("query", 2), ("gallery", 6)):
        rows = torch.randn(n, 8, 5 + 768, generator=g)
        rows[:, :, 3] = 0.0
        rows[:, 6:] = 0.0
        rows[:, 6:, 3] = 1.0  # two padding rows per image
        with h5py.File(folder / f"dinov2_{split}_local.hdf5", "w") as f:
            f.create_dataset("features", data=rows.numpy())
    gnd = [
        {"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 9, 9]},
        {"easy": [3], "hard": [4], "junk": []},
    ]
    with open(folder / "gnd_toyoxford.pkl", "wb") as f:
        pickle.dump({"gnd": gnd, "imlist": [], "qimlist": []}, f)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 3, 4, 1, 2, 5]], dtype=torch.float32)
    sims = torch.linspace(0.9, 0.4, 6).expand(2, 6)
    with open(folder / "nn_superglobal.pkl", "wb") as f:
        pickle.dump(torch.stack([sims, ids]), f)  # the official (2, Q, K) tensor, ids stored as floats
    checkpoint = tmp_path / "dinov2_ames.pt"
    torch.save({"state": create_model("dinov2_ames").state_dict()}, checkpoint)
    common = ("examples/ames_revisited.py", "--data-root", str(tmp_path / "data"), "--dataset", "toyoxford")
    common += ("--checkpoint", str(checkpoint), "--device", "cpu", "--top-k", "6")

    # lamb = 1 keeps the global order: q0 is perfect; q1 has its positives 3, 4 at ranks 1, 2 (M: AP =
    # ((0/1 + 1/2)/2 + (1/2 + 2/3)/2)/2) and, junk 3 ignored, its hard positive at rank 1 (H: AP = 1/4)
    result = _run(*common, "--lamb", "1.0", "--temp", "1.0")
    assert result.returncode == 0, result.stderr
    medium = 100 * (1 + ((0 / 1 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2) / 2
    hard = 100 * (1 + 1 / 4) / 2
    assert f"global shortlist: M {medium:.2f}, H {hard:.2f}" in result.stdout
    assert f"best: k=6 lamb=1.0 temp=1.0: M {medium:.2f}, H {hard:.2f}" in result.stdout
    assert "2 queries, 6 database images, shortlist of 6" in result.stdout

    streamed = _run(*common, "--stream")  # the model's own (lamb, temp), descriptors read per candidate
    assert streamed.returncode == 0, streamed.stderr
    assert re.search(r"best: k=6 lamb=0.55 temp=0.3: M [\d.]+, H [\d.]+", streamed.stdout), streamed.stdout
    assert np.isfinite(float(re.search(r"M ([\d.]+), H", streamed.stdout.splitlines()[-1])[1]))


def test_mile_training_example_runs(tmp_path: Path) -> None:
    """Folder-per-object data -> SSL -> set embeddings of query/target folders: AR@10 rises well above the
    untrained model, and where raw pixels stay ahead the output says why (a ViT from random weights)."""
    out = tmp_path / "mile"
    result = _run(
        "examples/mile_train.py",
        *("--steps", "200", "--eval-every", "0", "--threads", "1", "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    assert losses and all(0 < v < 20 for v in losses), result.stdout
    rows = _table(result.stdout, r"^(raw pixels|untrained|after SSL \(teacher\))\s+([\d.\s]+)$")
    assert set(rows) == {"raw pixels", "untrained", "after SSL (teacher)"}, result.stdout
    ar10 = {name: values[0] for name, values in rows.items()}
    trained, untrained, pixels = ar10["after SSL (teacher)"], ar10["untrained"], ar10["raw pixels"]
    assert trained > untrained + 4.0, result.stdout
    if trained < pixels:
        assert "raw pixels win: the backbone is a 2-block ViT trained from random weights" in result.stdout
    assert (out / "mile_teacher.pt").is_file()
    assert sorted(p.name for p in (out / "data" / "query").iterdir()) == sorted(
        p.name for p in (out / "data" / "target").iterdir()
    )


def test_avsl_training_example_runs(tmp_path: Path) -> None:
    """A few epochs of AVSL on the digits beat the untrained network under the pairwise evaluation."""
    picture = tmp_path / "why.png"
    result = _run("examples/avsl_train.py", "--epochs", "3", "--out", str(picture))
    assert result.returncode == 0, result.stderr
    rows = _table(result.stdout, r"^(untrained|trained|trained, shortlist 200)\s+([\d.\s]+)$")
    assert len(rows) == 3, result.stdout
    assert rows["trained"][0] > rows["untrained"][0]  # Recall@1
    assert abs(rows["trained, shortlist 200"][0] - rows["trained"][0]) < 5.0
    assert picture.is_file() and picture.stat().st_size > 20_000


def test_mic_training_example_runs() -> None:
    """MIC's two tasks with re-clustering on the digits beat the untrained network on unseen digits."""
    result = _run("examples/mic_train.py", "--epochs", "8")  # 12 by default
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("re-clustered on the shared embedding") == 2  # after epochs 3 and 7
    rows = _table(result.stdout, r"^(untrained|trained)\s+([\d.\s]+)$")
    assert len(rows) == 2, result.stdout
    assert rows["trained"][0] > rows["untrained"][0]  # Recall@1
    assert rows["trained"][3] > rows["untrained"][3] + 5.0  # MAP@R
