"""Model registry, builders and checkpoint I/O.

Model families register their builders when this package is imported; ``create_model`` and ``hubconf.py``
find them through the registry.
"""

# model families register their builders on import
from objretrieval.models import ames, avsl, cvnet, mic, mile  # noqa: F401  (registers the builders)
from objretrieval.models.ames import AMES, AMES_FUSION
from objretrieval.models.avsl import (
    AVSL,
    AttributableSimilarity,
    AVSLEmbedder,
    AVSLExplanation,
    AVSLFeatures,
    AVSLScorer,
    convert_official_avsl,
    read_official_avsl,
)
from objretrieval.models.builder import create_model, hub_entrypoint
from objretrieval.models.checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    checkpoint_metadata,
    download_pretrained,
    fetch_pretrained,
    load_state_dict_into,
    read_checkpoint,
    save_checkpoint,
    unwrap_state_dict,
)
from objretrieval.models.cvnet import CVNetBackbone
from objretrieval.models.heads import DINOHead
from objretrieval.models.mic import MIC, MICOutput, convert_official_mic
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
    split_model_name,
    unregister_model,
)
from objretrieval.models.resnet import ResNetTrunk

__all__ = [
    "AMES",
    "AMES_FUSION",
    "AVSL",
    "MIC",
    "MILE",
    "NATIVE_FORMAT",
    "AVSLEmbedder",
    "AVSLExplanation",
    "AVSLFeatures",
    "AVSLScorer",
    "AttributableSimilarity",
    "CVNetBackbone",
    "CheckpointFormat",
    "CheckpointMismatchError",
    "DINOHead",
    "LoadReport",
    "MICOutput",
    "MILEAggregator",
    "ModelEntry",
    "PretrainedCfg",
    "ResNetTrunk",
    "checkpoint_metadata",
    "convert_official_avsl",
    "convert_official_mic",
    "convert_official_mile",
    "create_model",
    "download_pretrained",
    "fetch_pretrained",
    "get_model_entry",
    "hub_entrypoint",
    "list_models",
    "list_pretrained",
    "load_state_dict_into",
    "read_checkpoint",
    "read_official_avsl",
    "register_model",
    "save_checkpoint",
    "split_model_name",
    "unregister_model",
    "unwrap_state_dict",
]
