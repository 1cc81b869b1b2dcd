"""The design's ``featcache`` (COCO reading, target rasterization, analysis, ONNX extraction, the Zarr
store), kept at the checkout's root as a name only: the code is ``roiseg.data`` on the shared layer
``roiseg.common`` (see ``roiseg/__init__.py`` for the layers).  Re-exports for scripts that import
``featcache``; the wheel installs ``roiseg`` alone."""
from roiseg.data.analyze import run_analyze
from roiseg.data.cache import CacheConfig, run_cache
from roiseg.data.coco import load_person_records
from roiseg.data.extractor import Extractor
from roiseg.data.store import FeatureStore

__all__ = ["CacheConfig", "Extractor", "FeatureStore", "load_person_records", "run_analyze", "run_cache"]
