"""torch.hub entry points: every model in objretrieval's registry, e.g.

    model = torch.hub.load("org/objretrieval", "dinov2_ames")

Entry points load the pretrained weights by default when the model has them; keyword arguments are passed to
``objretrieval.create_model``.
"""

from objretrieval.models import hub_entrypoint as _hub_entrypoint
from objretrieval.models import list_models as _list_models

dependencies = ["torch", "torchvision", "timm", "peft", "faiss", "numpy", "h5py", "safetensors", "tqdm"]


def __getattr__(name: str):
    if name in _list_models():
        return _hub_entrypoint(name)
    raise AttributeError(f"objretrieval hub has no entry point {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_list_models()])
