"""Datasets: the embedded SyntheticShapes, a corruption-tolerant ImageFolder, and the dataset factory."""


class DataError(ValueError):
    """Bad or missing data: the message names the path and the fix."""


from .synthetic import SHAPES, SyntheticShapes, load_boxes_json  # noqa: E402
from .folder import IMG_EXTENSIONS, IndexedDataset, SafeImageFolder, build_dataset  # noqa: E402

__all__ = ["DataError", "SHAPES", "SyntheticShapes", "load_boxes_json", "SafeImageFolder", "IndexedDataset",
           "build_dataset", "IMG_EXTENSIONS"]
