"""Settings: every option's name, type, default, allowed values and validation, in one place.

This package imports nothing heavy, so the command line builds its help from it at once. One frozen dataclass per
stage, composed from shared parts (``settings_file`` layers pipeline.toml over them): ``shared`` holds the allowed
values and the dataset and backbone parts, ``stages`` the extraction, head, report and audit settings,
``finetune`` the fine-tuning settings.
"""

from .finetune import FinetuneConfig
from .shared import (
    AUGMENTS, AUTO_TAP, BACKBONE_AND_DATASET, CAPTURES, JOIN, COMPRESSIONS, DECODES, DTYPES, ENGINES, HEAD_INITS, HEAD_NAMES, NORMS, ON_ERROR, OPTIMIZERS, PARALLEL, POOLS,
    PREPROCESSING, PROJECTIONS, SCHEDULES, SPLITS, BackboneOptions, DatasetOptions, DatasetSpec, tap_parts,
)
from .stages import AuditConfig, ExtractConfig, HeadConfig, ReportConfig

__all__ = [
    "DatasetSpec", "DatasetOptions", "BackboneOptions", "ExtractConfig", "HeadConfig", "FinetuneConfig", "ReportConfig", "AuditConfig",
    "AUTO_TAP", "JOIN", "tap_parts", "SPLITS", "ON_ERROR", "DTYPES", "COMPRESSIONS", "ENGINES", "PARALLEL", "DECODES", "CAPTURES", "HEAD_NAMES", "POOLS", "PREPROCESSING",
    "OPTIMIZERS", "SCHEDULES", "AUGMENTS", "HEAD_INITS", "NORMS", "PROJECTIONS", "BACKBONE_AND_DATASET",
]
