"""torch.hub entry points: every model in objretrieval's registry, e.g.

    model = torch.hub.load("org/objretrieval", "dinov2_ames")
    model = torch.hub.load("org/objretrieval", "mile_vitl.100m")  # a pretrained tag

Entry points load the pretrained weights by default when the model has them; keyword arguments are passed to
``objretrieval.create_model``.
"""

from objretrieval.models import hub_entrypoint as _hub_entrypoint
from objretrieval.models import list_models as _list_models
from objretrieval.models import list_pretrained as _list_pretrained

dependencies = ["torch", "torchvision", "timm", "peft", "faiss", "numpy", "h5py", "safetensors", "tqdm"]


def __getattr__(name: str):
    # a registered name, or a "name.tag" as objretrieval.list_pretrained() prints it
    if name in _list_models() or name in _list_pretrained():
        return _hub_entrypoint(name)
    raise AttributeError(f"objretrieval hub has no entry point {name!r}")


def __dir__() -> list[str]:  # what torch.hub.list shows and torch.hub.load accepts
    return sorted([*globals(), *_list_models(), *_list_pretrained()])
