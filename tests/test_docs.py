"""Every fenced ``python`` block of README.md and docs/**/*.md runs.

One test per block, named ``file:line`` (the line of its opening fence). A block runs in a fresh namespace, in
a temporary working directory, with one thread and seed 0; afterwards every module-level dict of the package
(the model and metric registries) is restored, so a block that registers something leaves no trace. A block
that raises fails its test: nothing is skipped for being broken.

An HTML comment on the line right above a fence (invisible in the rendered page) adjusts how it runs:

- ``<!-- doctest: setup=offline,ames_data -->`` runs the named setups of :data:`SETUPS` first. Setups give a
  block the inputs a reader brings (small random tensors and files with the names the prose uses) or stand in
  for what a test cannot have (``offline``: downloaded weights become random ones, at test size).
- ``<!-- doctest: continue -->`` runs the block after the page's previous block, in the same namespace (and
  with that block's setups), for a page that builds one example across several blocks.
- ``<!-- doctest: skip reason="needs the authors' ROxford5k data folder" -->`` skips it, with the reason shown
  in pytest's summary. A skip needs a reason, and is for what no small input can stand in for.

An unknown directive or setup name is an error, so a typo cannot turn a block off.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
# A hang guard: blocks take seconds, but the first MILE block imports peft (and with it transformers), which
# took 20 s on an idle 2-core machine and 70 s on a loaded one.
BLOCK_TIMEOUT_S = 300

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})\s*(?P<lang>[\w+-]*)")
_DIRECTIVE = re.compile(r"^\s*<!--\s*doctest:(?P<body>.*?)-->\s*$")


@dataclass
class Block:
    """A fenced python block and its directive."""

    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    setups: list[str] = field(default_factory=list)
    skip: str | None = None
    after: Block | None = None  # the block this one continues

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"


def _parse_directive(text: str, where: str) -> dict[str, str]:
    options = {}
    for token in shlex.split(text):
        key, _, value = token.partition("=")
        if key not in ("setup", "skip", "reason", "continue"):
            raise ValueError(f"{where}: unknown doctest directive {key!r} in {text!r}")
        options[key] = value
    if "skip" in options and not options.get("reason"):
        raise ValueError(f'{where}: a doctest skip needs a reason="..."')
    return options


def extract_blocks(path: Path) -> list[Block]:
    """The ``python`` blocks of one markdown file, with their directives resolved."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    used: set[int] = set()  # lines of the directives that apply to a block
    fenced: set[int] = set()  # lines inside code fences, where a directive is only an example
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, ticks, lang = opening["indent"], opening["ticks"], opening["lang"]
        end = i + 1
        while end < len(lines) and not re.match(rf"^{indent}{ticks}\s*$", lines[end]):
            end += 1
        fenced.update(range(i, end + 1))
        if lang == "python":
            body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]]
            block = Block(path, i + 1, textwrap.dedent("\n".join(body)) + "\n")
            where = f"{path.name}:{i + 1}"
            above = next((j for j in range(i - 1, -1, -1) if lines[j].strip()), None)
            directive = _DIRECTIVE.match(lines[above]) if above is not None else None
            options = _parse_directive(directive["body"], where) if directive else {}
            if directive:
                used.add(above)
            block.setups = [s for s in options.get("setup", "").split(",") if s]
            block.skip = options.get("reason") if "skip" in options else None
            if "continue" in options:
                if not blocks:
                    raise ValueError(f"{where}: 'continue' on the first python block of the page")
                block.after = blocks[-1]
            blocks.append(block)
        i = end + 1
    stray = [n + 1 for n, line in enumerate(lines) if _DIRECTIVE.match(line) and n not in used | fenced]
    if stray:
        raise ValueError(f"{path.name}:{stray[0]}: a doctest directive must be right above a python block")
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in DOC_FILES for block in extract_blocks(path)]


# -- setups -----------------------------------------------------------------------------------------------------

Setup = Callable[[dict[str, Any], pytest.MonkeyPatch], None]
SETUPS: dict[str, Setup] = {}


def doc_setup(name: str) -> Callable[[Setup], Setup]:
    def register(fn: Setup) -> Setup:
        SETUPS[name] = fn
        return fn

    return register


#: Overrides that bring the big models to test size under ``offline``: a one-layer ViT-S for MILE, a ResNet with
#: one block per stage for the ResNet50 trunks. Only sizes change; the calls a block makes (forward, update,
#: explain, training steps) are those of the full model.
SMALL_MODELS: dict[str, dict[str, Any]] = {
    **{
        name: {"backbone": "vit_small_patch14_reg4_dinov2", "backbone_kwargs": {"depth": 1}}
        for name in ("mile_vitl", "mile_vitb", "mile_vits")
    },
    "avsl_resnet50": {"arch": "resnet10"},
    "mic_resnet50": {"arch": "resnet10"},
}


@doc_setup("offline")
def _offline(ns: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights that would be downloaded or read from a file the reader has become random ones.

    ``create_model`` ignores ``pretrained``, torchvision ``weights`` and a ``checkpoint`` path that does not
    exist, and builds the model at test size (:data:`SMALL_MODELS`); ``torch.hub.load("org/objretrieval",
    ...)`` loads this checkout's ``hubconf.py`` with ``pretrained=False``.
    """
    import objretrieval
    import objretrieval.models
    import objretrieval.models.builder as builder

    create = builder.create_model

    def create_offline(
        name: str, pretrained: bool | str = False, checkpoint: Any = None, **kwargs: Any
    ) -> Any:
        kwargs.pop("weights", None)
        if isinstance(checkpoint, (str, os.PathLike)) and not Path(checkpoint).exists():
            checkpoint = None
        return create(name, checkpoint=checkpoint, **{**SMALL_MODELS.get(name, {}), **kwargs})

    for module in (objretrieval, objretrieval.models, builder):
        monkeypatch.setattr(module, "create_model", create_offline)
    hub_load = torch.hub.load

    def load(repo: str, model: str, *args: Any, **kwargs: Any) -> Any:
        if repo != "org/objretrieval":
            raise RuntimeError(
                f"doc block loads {repo!r} from torch.hub; only org/objretrieval is redirected"
            )
        return hub_load(str(REPO_ROOT), model, *args, source="local", **{**kwargs, "pretrained": False})

    monkeypatch.setattr(torch.hub, "load", load)


def _unit(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def _descriptor_file(path: str, num_images: int, rows: int, dim: int, g: torch.Generator) -> None:
    from objretrieval.descriptors import DescriptorStore
    from objretrieval.descriptors.local import HEADER, PAD, WEIGHT

    data = torch.zeros(num_images, rows, HEADER + dim)
    data[..., HEADER:] = _unit(num_images, rows, dim, g=g)
    data[..., WEIGHT] = torch.linspace(1.0, 0.1, rows)
    data[:, -2:] = 0.0  # the last two rows of every image are padding
    data[:, -2:, PAD] = 1.0
    with DescriptorStore.create(path, num_images, rows, dim) as store:
        store.write(0, data)


@doc_setup("ames_data")
def _ames_data(ns: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """4 queries and 120 database images: global descriptors ``query_global`` (4, 64) and ``db_global``
    (120, 64); local ones as tensors ``query_local`` (2, 40, 768), ``db_local`` (2, 12, 768) with
    ``query_padding``/``db_padding`` masks, and as the files ``q_local.h5`` and ``db_local.h5``; ``gnd``, a
    revisited ground truth (easy, hard, junk per query)."""
    g = torch.Generator().manual_seed(0)
    ns["query_global"], ns["db_global"] = _unit(4, 64, g=g), _unit(120, 64, g=g)
    ns["query_local"], ns["db_local"] = _unit(2, 40, 768, g=g), _unit(2, 12, 768, g=g)
    ns["query_padding"] = torch.zeros(2, 40, dtype=torch.bool)
    ns["db_padding"] = torch.zeros(2, 12, dtype=torch.bool)
    ns["query_padding"][:, -5:] = ns["db_padding"][:, -2:] = True
    _descriptor_file("q_local.h5", 4, 40, 768, g)
    _descriptor_file("db_local.h5", 120, 12, 768, g)
    ns["gnd"] = [{"easy": [3 * q], "hard": [3 * q + 1], "junk": [3 * q + 2]} for q in range(4)]


@doc_setup("images")
def _images(ns: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Normalised random images: ``images`` (40, 3, 80, 80) of 10 classes (``labels``, ``train_labels``), two of
    them as ``image_a``/``image_b`` (and ``a``/``b``), ``batches`` (a list of 5), ``class_batch`` and
    ``shared_batch`` (``(images, labels)`` of 8), ``test_loader``, ``train_loader``, ``train_eval_loader``
    (DataLoaders of ``(image, label)`` batches of 8 over all images, in order) and ``loader`` (a training loader
    of two such batches)."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(40, 3, 80, 80, generator=g), torch.arange(10).repeat_interleave(4)
    ns.update(images=images, labels=labels, train_labels=labels, batches=list(images.split(8)))
    ns["image_a"] = ns["a"] = images[0]
    ns["image_b"] = ns["b"] = images[1]
    ns["class_batch"] = ns["shared_batch"] = (images[:8], labels[:8])
    for name in ("test_loader", "train_loader", "train_eval_loader"):
        ns[name] = DataLoader(TensorDataset(images, labels), batch_size=8)
    ns["loader"] = DataLoader(TensorDataset(images[:16], labels[:16]), batch_size=8)


@doc_setup("avsl_run")
def _avsl_run(ns: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """``runs/cub``: the three files a run of the official AVSL code saves, for a random ``avsl_resnet50``."""
    from objretrieval.models import builder
    from tests.test_avsl import write_official_run

    Path("runs/cub").mkdir(parents=True)
    write_official_run(builder.create_model("avsl_resnet50"), Path("runs/cub"))


@doc_setup("sets")
def _sets(ns: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sets of three normalised images, ``images`` (2, 3, 3, 224, 224), the first padded to two (``mask``
    (2, 3), True at padding), and ``new_image`` (2, 3, 224, 224), one more image per set."""
    g = torch.Generator().manual_seed(0)
    ns["images"] = torch.randn(2, 3, 3, 224, 224, generator=g)
    ns["mask"] = torch.tensor([[False, False, True], [False, False, False]])
    ns["new_image"] = torch.randn(2, 3, 224, 224, generator=g)


# -- running ----------------------------------------------------------------------------------------------------


@pytest.fixture
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Temp cwd, one thread (torch and faiss), seed 0, no network, and the package's module-level dicts restored
    afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    download = torch.hub.download_url_to_file

    def local_only(url: str, *args: Any, **kwargs: Any) -> None:
        if not url.startswith("file://"):
            raise RuntimeError(f"doc block downloads {url}: give it setup=offline, or a skip with a reason")
        download(url, *args, **kwargs)

    monkeypatch.setattr(torch.hub, "download_url_to_file", local_only)
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    torch.manual_seed(0)
    try:
        with package_dicts_restored():
            yield
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(faiss_threads)


@contextlib.contextmanager
def package_dicts_restored() -> Iterator[None]:
    """Put back the contents of every module-level dict of objretrieval (the model and metric registries...)."""
    package = [m for name, m in list(sys.modules.items()) if name.split(".")[0] == "objretrieval" and m]
    saved = [
        (d, dict(d))
        for m in package
        for k, d in vars(m).items()
        if type(d) is dict and not k.startswith("__")
    ]
    try:
        yield
    finally:
        for d, contents in saved:
            d.clear()
            d.update(contents)


def _run_block(block: Block, ns: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    if block.after is not None:
        _run_block(block.after, ns, monkeypatch)
    for name in block.setups:
        if name not in SETUPS:
            raise KeyError(f"{block.id}: unknown doctest setup {name!r}; known: {sorted(SETUPS)}")
        SETUPS[name](ns, monkeypatch)
    # padded so that tracebacks point at the markdown file's own line numbers
    code = compile("\n" * block.line + block.code, str(block.path), "exec")
    exec(code, ns)


def _params() -> list[Any]:
    params = []
    for block in all_blocks():
        marks = [pytest.mark.timeout(BLOCK_TIMEOUT_S)]
        if block.skip is not None:
            marks.append(pytest.mark.skip(reason=f"{block.id}: {block.skip}"))
        params.append(pytest.param(block, id=block.id, marks=marks))
    return params


@pytest.mark.usefixtures("_isolated")
@pytest.mark.parametrize("block", _params())
def test_doc_block_runs(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    _run_block(block, {"__name__": "__doc_block__"}, monkeypatch)


# -- the extraction itself ----------------------------------------------------------------------------------------


def test_extraction_reads_directives_and_continuations(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        textwrap.dedent(
            """\
            ```python
            x = 1
            ```
            <!-- doctest: setup=offline,images -->
            ```python
            y = x
            ```

            <!-- doctest: continue -->

            ```python
            z = y
            ```
            - a list item:

              ```python
              if True:
                  w = 2
              ```
            ```bash
            echo not python
            ```
            <!-- doctest: skip reason="needs a GPU and 40 GB" -->
            ```python
            big()
            ```
            ```markdown
            <!-- doctest: continue -->
            ```
            """
        )
    )
    blocks = extract_blocks(page)
    assert [b.line for b in blocks] == [1, 5, 11, 16, 24]
    assert [b.setups for b in blocks] == [[], ["offline", "images"], [], [], []]
    assert blocks[2].after is blocks[1] and blocks[1].after is None
    assert blocks[3].code == "if True:\n    w = 2\n"
    assert blocks[4].skip == "needs a GPU and 40 GB"
    ns: dict[str, Any] = {}
    exec(blocks[0].code, ns)
    assert ns["x"] == 1


@pytest.mark.parametrize(
    "directive, message",
    [
        ("<!-- doctest: skip -->", "needs a reason"),
        ('<!-- doctest: skipp reason="x" -->', "unknown doctest directive 'skipp'"),
        ("<!-- doctest: setup=images -->\nSome prose.\n", "must be right above a python block"),
    ],
)
def test_bad_directives_are_errors(tmp_path: Path, directive: str, message: str) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"{directive}\n```python\npass\n```\n")
    with pytest.raises(ValueError, match=message):
        extract_blocks(page)


def test_unknown_setup_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    block = Block(REPO_ROOT / "README.md", 1, "pass\n", setups=["ofline"])
    with pytest.raises(KeyError, match="unknown doctest setup 'ofline'"):
        _run_block(block, {}, monkeypatch)


def test_a_block_that_registers_a_model_leaves_no_trace() -> None:
    import objretrieval
    from objretrieval.models import register_model

    before = objretrieval.list_models()
    with package_dicts_restored():
        register_model(name="doc_block_net")(torch.nn.Identity)
        assert "doc_block_net" in objretrieval.list_models()
    assert objretrieval.list_models() == before


def test_docs_have_python_blocks_and_skips_are_rare() -> None:
    blocks = all_blocks()
    assert len(blocks) >= 30
    assert sum(b.skip is not None for b in blocks) <= len(blocks) // 10
