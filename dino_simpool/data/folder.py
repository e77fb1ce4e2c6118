"""SafeImageFolder (ImageFolder that survives corrupt files), IndexedDataset and the dataset factory."""
from __future__ import annotations

import logging
import os

from PIL import Image

from . import DataError

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_LAYOUT_HINT = "expected an ImageFolder: <root>/<class_name>/<image>.jpg (one sub-folder per class)"


def pil_loader(path):
    with open(path, "rb") as fh:
        img = Image.open(fh)
        img.load()  # decode now, so a truncated or corrupt file fails here and not later in a transform
        return img.convert("RGB")


def _normalize_subset(subset):
    if subset is None:
        return -1
    if int(subset) != subset or (subset < 1 and subset != -1):
        raise ValueError(f"subset must be -1 (all images) or a positive number of images per class, got {subset!r}")
    return int(subset)


class SafeImageFolder:
    """ImageFolder semantics (classes = sorted sub-folders, images found recursively in sorted order), plus:

    * ``subset=K`` keeps the first K images of each class (sorted order); -1 keeps all.
    * A missing root, a root with no class folders, a class folder with no images, or no images at all raise
      ``DataError`` at construction, naming the path and the fix.
    * An image that fails to load (corrupt, truncated, not an image) is logged once with its path
      (``logging.warning``, once per file and process) and replaced by the next loadable sample
      (index + 1, + 2, ... wrapping around), so training goes on. If no image at all can be loaded, ``DataError``.
    """

    def __init__(self, root, transform=None, subset=-1, loader=pil_loader, extensions=IMG_EXTENSIONS):
        root = os.fspath(root)
        subset = _normalize_subset(subset)
        self.root = root
        self.transform = transform
        self.loader = loader
        self.subset = subset
        extensions = tuple(e.lower() for e in extensions)
        if not os.path.exists(root):
            raise DataError(f"data path {root} does not exist; pass --data_path pointing to a folder with "
                            f"train/ and val/ ImageFolders ({_LAYOUT_HINT}), or omit it to use the embedded dataset")
        if not os.path.isdir(root):
            raise DataError(f"data path {root} is not a directory; {_LAYOUT_HINT}")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DataError(f"{root} has no class folders; {_LAYOUT_HINT}")
        samples = []
        for k, cls in enumerate(classes):
            cdir = os.path.join(root, cls)
            files = []
            for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
                dirnames.sort()
                for name in sorted(filenames):
                    if name.lower().endswith(extensions) and not name.startswith("."):
                        files.append(os.path.join(dirpath, name))
            if not files:
                raise DataError(f"class folder {cdir} contains no images (extensions: {', '.join(extensions)}); "
                                f"add images to it or remove the folder")
            if subset > 0:
                files = files[:subset]
            samples.extend((f, k) for f in files)
        if not samples:  # unreachable given the per-class check, kept for safety
            raise DataError(f"{root} contains no images; {_LAYOUT_HINT}")
        self.classes = classes
        self.class_to_idx = {c: k for k, c in enumerate(classes)}
        self.samples = samples
        self.imgs = samples
        self.targets = [k for _, k in samples]
        self._bad = set()

    def __len__(self):
        return len(self.samples)

    def __repr__(self):
        return f"SafeImageFolder(root={self.root!r}, images={len(self)}, classes={len(self.classes)})"

    def _load_from(self, i):
        """-> (PIL image, label, index actually loaded): ``i``, or the next loadable index if ``i`` is unreadable."""
        n = len(self.samples)
        for step in range(n):
            k = (i + step) % n
            if k in self._bad:
                continue
            path, label = self.samples[k]
            try:
                return self.loader(path), label, k
            except Exception as e:  # corrupt / truncated / unreadable file: skip it, keep training
                self._bad.add(k)
                logger.warning("skipping unreadable image %s (%s: %s); using another sample instead",
                               path, type(e).__name__, e)
        raise DataError(f"none of the {n} images under {self.root} could be loaded (all corrupt or unreadable); "
                        f"check the files")

    def __getitem__(self, i):
        img, label, _ = self.get_checked(i)
        return img, label

    def get_checked(self, i):
        """-> (transformed image, label, ok): ``ok`` is False when image ``i`` is unreadable and another sample
        stands in for it. Training takes the stand-in; evaluation (``eval.features``) drops it instead, so that a
        corrupt file neither duplicates another image nor shifts an accuracy."""
        n = len(self.samples)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self!r}")
        i = int(i) % n
        img, label, k = self._load_from(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, label, k == i


class IndexedDataset:
    """Wraps a dataset so that items are ``(img, label, index)``; other attributes pass through."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, label = self.ds[i]
        return img, label, i

    def __getattr__(self, name):
        if name == "ds":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.ds, name)


def build_dataset(data_path, split, transform=None, subset=-1, image_size=64, images_per_class=None, **synthetic):
    """``data_path=None`` -> the embedded ``SyntheticShapes(split, image_size, images_per_class)``;
    else ``SafeImageFolder(data_path/split, transform, subset)``.

    ``subset=K`` keeps the first K images per class in both cases. Extra keyword arguments (``seed``,
    ``num_classes``) go to SyntheticShapes.
    """
    subset = _normalize_subset(subset)
    if data_path is None or data_path == "":
        from .synthetic import DEFAULT_IMAGES_PER_CLASS, SyntheticShapes
        if split not in DEFAULT_IMAGES_PER_CLASS:
            raise DataError(f"the embedded dataset has splits 'train' and 'val', got {split!r}")
        ipc = images_per_class if images_per_class is not None else DEFAULT_IMAGES_PER_CLASS[split]
        if subset > 0:
            ipc = min(ipc, subset)
        return SyntheticShapes(split=split, image_size=image_size, images_per_class=ipc, transform=transform,
                               **synthetic)
    data_path = os.fspath(data_path)
    if not os.path.isdir(data_path):
        raise DataError(f"data path {data_path} does not exist or is not a directory; pass --data_path pointing to "
                        f"a folder with train/ and val/ ImageFolders, or omit it to use the embedded dataset")
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise DataError(f"{root} does not exist: --data_path must hold a '{split}/' ImageFolder (DINO layout: "
                        f"<data_path>/train/<class>/*.jpg and <data_path>/val/<class>/*.jpg)")
    return SafeImageFolder(root, transform=transform, subset=subset)
