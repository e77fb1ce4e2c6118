"""Datasets: the embedded SyntheticShapes, the one symlink-safe folder scan, a corruption-tolerant ImageFolder, and the
dataset factory."""


class DataError(ValueError):
    """Bad or missing data: the message names the path and the fix."""


from .synthetic import LAYOUTS, SHAPES, SyntheticShapes, load_boxes_json  # noqa: E402
from .folder import (IMG_EXTENSIONS, IndexedDataset, SafeImageFolder, ScanReport, build_dataset,  # noqa: E402
                     resolve_split_root, scan_class_folders, scan_images)

__all__ = ["DataError", "SHAPES", "LAYOUTS", "SyntheticShapes", "load_boxes_json", "SafeImageFolder",
           "IndexedDataset", "build_dataset", "resolve_split_root", "scan_images", "scan_class_folders", "ScanReport",
           "IMG_EXTENSIONS"]
