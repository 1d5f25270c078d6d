"""Model registry, builders and checkpoint I/O.

Model families register their builders when this package is imported; ``create_model`` and ``hubconf.py``
find them through the registry.
"""

# model families register their builders on import
from objretrieval.models import ames, cvnet, mile  # noqa: F401  (registers the builders)
from objretrieval.models.ames import AMES, AMES_FUSION
from objretrieval.models.builder import create_model, hub_entrypoint
from objretrieval.models.checkpoint import (
    CheckpointMismatchError,
    checkpoint_metadata,
    download_pretrained,
    load_state_dict_into,
    read_checkpoint,
    save_checkpoint,
    unwrap_state_dict,
)
from objretrieval.models.cvnet import CVNetBackbone
from objretrieval.models.heads import DINOHead
from objretrieval.models.mile import MILE, MILEAggregator, convert_official_mile
from objretrieval.models.registry import (
    NATIVE_FORMAT,
    CheckpointFormat,
    ModelEntry,
    PretrainedCfg,
    get_model_entry,
    list_models,
    list_pretrained,
    register_model,
    unregister_model,
)

__all__ = [
    "AMES",
    "AMES_FUSION",
    "MILE",
    "NATIVE_FORMAT",
    "CVNetBackbone",
    "CheckpointFormat",
    "CheckpointMismatchError",
    "DINOHead",
    "MILEAggregator",
    "ModelEntry",
    "PretrainedCfg",
    "checkpoint_metadata",
    "convert_official_mile",
    "create_model",
    "download_pretrained",
    "get_model_entry",
    "hub_entrypoint",
    "list_models",
    "list_pretrained",
    "load_state_dict_into",
    "read_checkpoint",
    "register_model",
    "save_checkpoint",
    "unregister_model",
    "unwrap_state_dict",
]
