"""pipeline: cache a frozen backbone's features once, then fit heads on them in seconds."""

__version__ = "0.1.0"

from .backbones import Backbone, load_backbone  # noqa: E402
from .cache import FeatureCache, read_cache, write_features  # noqa: E402
from .data import DatasetSpec, load_split  # noqa: E402
from .evaluate import compare, evaluate  # noqa: E402
from .extract import ExtractConfig, ExtractResult, extract  # noqa: E402
from .finetune import FinetuneConfig, finetune  # noqa: E402
from .fit import HeadConfig, fit_head  # noqa: E402
from .predict import predict  # noqa: E402
from .report import ReportConfig, build_report  # noqa: E402
from .taps import FeatureHooks, Tap, list_taps  # noqa: E402

__all__ = [
    "Backbone",
    "DatasetSpec",
    "ExtractConfig",
    "ExtractResult",
    "FeatureCache",
    "FeatureHooks",
    "FinetuneConfig",
    "HeadConfig",
    "ReportConfig",
    "Tap",
    "compare",
    "build_report",
    "evaluate",
    "extract",
    "finetune",
    "fit_head",
    "list_taps",
    "load_backbone",
    "load_split",
    "predict",
    "read_cache",
    "write_features",
]
