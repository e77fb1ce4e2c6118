"""The one folder scanner, SafeImageFolder (an ImageFolder that survives corrupt files and link loops),
IndexedDataset and the dataset factory (both dataset layouts: DINO's folder of class folders, SimPool's train/ + val/).

Every reader of an image folder in the project (training, k-NN, linear, attention maps, localization) goes through
:func:`scan_class_folders` or :func:`scan_images`: a link to a file or folder is followed at most once, an image is
counted once (under the class where its real file lies), unreadable sub-folders are skipped, and one warning counts
what was skipped.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from operator import itemgetter

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


def _skipped_hint(report: "ScanReport") -> str:
    return f" after skipping {report.skipped} entries (see the warning above)" if report.skipped else ""


def _normalize_subset(subset):
    if subset is None:
        return -1
    if int(subset) != subset or (subset < 1 and subset != -1):
        raise ValueError(f"subset must be -1 (all images) or a positive number of images per class, got {subset!r}")
    return int(subset)


# ----------------------------------------------------------------------------------------------------------------
# The one folder scanner (every dataset and evaluator that reads a folder of images goes through it)
_EXAMPLES = 3  # paths kept per kind of skipped entry, for the warning
_FOLDER_ORDER = itemgetter(0, 1)
SKIP_KINDS = ("loops", "duplicates", "unreadable", "broken")


@dataclass
class ScanReport:
    """What a scan skipped, by kind: a count and the first few paths of each.

    * ``loops``: links to a folder that contains them (``cat/loop -> ..``), or links that resolve to themselves;
    * ``duplicates``: an image or folder reached a second time (through a link or a bind mount);
    * ``unreadable``: folders that could not be listed (permissions, I/O errors);
    * ``broken``: links whose target does not exist.
    """

    root: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_KINDS, 0))
    examples: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in SKIP_KINDS})

    def add(self, kind: str, path: str, why: str = "") -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < _EXAMPLES:
            self.examples[kind].append(f"{path} ({why})" if why else path)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: what was skipped and why (empty when nothing was)."""
        if not self.skipped:
            return ""
        what = {"loops": "link loop(s) (a link to a folder that contains it)",
                "duplicates": "duplicate(s) (an image or folder reached again through a link)",
                "unreadable": "unreadable folder(s)", "broken": "broken link(s)"}
        parts = [f"{self.counts[k]} {what[k]}, e.g. {'; '.join(self.examples[k])}" for k in SKIP_KINDS
                 if self.counts[k]]
        return (f"scan of {self.root} skipped {self.skipped} entries: " + " | ".join(parts)
                + ". Each link is followed at most once and each image counted once, under the class of its real "
                  "file when it has one")


class _Scanner:
    """Walks folders with ``os.scandir``, following each link to a file or folder at most once.

    Written here rather than using ``os.walk(followlinks=True)`` / torchvision's ``make_dataset``: both re-enter a
    link loop until the path gets too long (exponential in the number of loops) and count an image reached by two
    paths twice. Every real folder is listed once, tracked by ``(st_dev, st_ino)``, and every image by its real path,
    so the work and the memory are bounded by the number of real folders and files. The real (link-free) trees of
    all labels are walked first and the folders behind links after them, so an image or folder that is reachable
    both directly and through a link is kept where it really lies. Names starting with ``.`` are skipped. The
    returned order is ``os.walk``'s (pre-order, a folder's files sorted by name before its sub-folders sorted by
    name), independent of the links.

    Cost: one ``lstat`` per folder and a few system calls per link; none per plain image file (``os.scandir``'s
    file types come with the listing), which matters on network file systems. So two hard links to one file are two
    images here (telling them apart would take a ``stat`` per image).
    """

    def __init__(self, root: str, extensions: tuple[str, ...]):
        self.extensions = tuple(e.lower() for e in extensions)
        self.report = ScanReport(root)
        self.visited: set[tuple[int, int]] = set()
        self.pending: deque[tuple[str, tuple[str, ...], int]] = deque()  # folders behind links, walked last
        self._real_dirs: dict[str, str] = {}  # realpath of the folders that links point into
        # the images found, per folder: (label, folder below the label's top, reached through a link?, folder as
        # reached, its real path, sorted names); folder None: names holds one (real path, path) pair
        self.folders: list[tuple] = []

    def mark_visited(self, path: str) -> tuple[int, int] | None:
        """Mark a top folder (the root, a class folder) as listed; None if it already was."""
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in self.visited:
            return None
        self.visited.add(key)
        return key

    def walk(self, top: str, label: int, parts: tuple[str, ...] = (), linked: bool = False) -> str | None:
        """Add the images under ``top`` (already marked visited) to ``label``; the error if ``top`` is unreadable."""
        stack = [(top, parts, os.path.realpath(top))]
        failed = None
        exts = self.extensions
        while stack:
            folder, rel, real = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except OSError as e:
                why = e.strerror or type(e).__name__
                self.report.add("unreadable", folder, why)
                if folder == top:
                    failed = f"{folder}: {why}"
                continue
            names = []
            for e in entries:
                name = e.name
                if name[0] == ".":
                    continue
                try:
                    if e.is_dir(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        key = (st.st_dev, st.st_ino)
                        if key in self.visited:  # a bind mount of a folder already listed
                            self.report.add("duplicates", e.path, "folder listed before")
                            continue
                        self.visited.add(key)
                        stack.append((e.path, rel + (name,), os.path.join(real, name)))
                    elif e.is_symlink():
                        self._link(e.path, real, rel + (name,), label)
                    elif name.lower().endswith(exts) and e.is_file(follow_symlinks=False):
                        names.append(name)
                except OSError as err:
                    self.report.add("unreadable", e.path, err.strerror or type(err).__name__)
            if names:  # plain files: no system call each, the file type came with the listing
                names.sort()
                self.folders.append((label, rel, linked, folder, real, names))
        return failed

    def drain(self) -> None:
        """Walk the folders found behind links (and the links found in them), each real folder once."""
        while self.pending:
            path, parts, label = self.pending.popleft()
            try:
                key = self.mark_visited(path)
            except OSError as e:
                self.report.add("broken", path, e.strerror or type(e).__name__)
                continue
            if key is None:
                self.report.add("duplicates", path, "folder listed before")
                continue
            self.walk(path, label, parts, linked=True)

    def _link(self, path: str, real_folder: str, parts: tuple[str, ...], label: int) -> None:
        """A link at ``path`` in the real folder ``real_folder``: a folder is queued, an image added."""
        try:
            st = os.stat(path)
        except OSError as e:
            kind = "loops" if e.errno == errno.ELOOP else "broken"
            self.report.add(kind, path, e.strerror or type(e).__name__)
            return
        if stat.S_ISDIR(st.st_mode):
            target = os.path.realpath(path)
            if real_folder == target or real_folder.startswith(target.rstrip(os.sep) + os.sep):
                self.report.add("loops", path, f"-> {os.readlink(path)}")
            elif (st.st_dev, st.st_ino) in self.visited:
                self.report.add("duplicates", path, f"-> {os.readlink(path)}, a folder listed before")
            else:
                self.pending.append((path, parts, label))
        elif stat.S_ISREG(st.st_mode) and self._is_image(os.path.basename(path)):
            self._add(self._real_file(os.path.join(real_folder, os.readlink(path))), path, parts, label)

    def _real_file(self, target: str) -> str:
        """The real path of a link's target: its folder's realpath (memoised: links tend to point into few
        folders), plus its name unless that is a link again."""
        folder, name = os.path.split(target)
        real = self._real_dirs.get(folder)
        if real is None:
            real = self._real_dirs[folder] = os.path.realpath(folder)
        path = os.path.join(real, name)
        return os.path.realpath(path) if os.path.islink(path) else path

    def _is_image(self, name: str) -> bool:
        return name.lower().endswith(self.extensions)

    def _add(self, real: str, path: str, parts: tuple[str, ...], label: int) -> None:
        """One image reached through a link to a file (``parts``: its path below the label's top)."""
        folder, name = os.path.split(path)
        real_folder, real_name = os.path.split(real)
        if real_name != name:  # the link's name and its target's differ: keep the pair as it is
            self.folders.append((label, parts[:-1], True, None, None, [(real, path)]))
        else:
            self.folders.append((label, parts[:-1], True, folder, real_folder, [name]))

    @staticmethod
    def _pairs(entry) -> list[tuple[str, str]]:
        """[(real path, path as reached)] of a folder entry of ``self.folders``."""
        _, _, _, folder, real, names = entry
        if folder is None:
            return names
        at = folder if folder.endswith(os.sep) else folder + os.sep
        in_real = real if real.endswith(os.sep) else real + os.sep
        return [(in_real + n, at + n) for n in names]

    def _kept_links(self) -> dict[str, str]:
        """real path -> the one path kept, for the images reached through links (plain files are unique: every real
        folder is listed once). A real file beats a link to it; among links, the first in os.walk order wins."""
        linked = [e for e in self.folders if e[2]]
        if not linked:
            return {}
        direct = {real: path for e in self.folders if not e[2] for real, path in self._pairs(e)}
        found = sorted(((e[0], e[1], os.path.basename(path)), real, path) for e in linked for real, path in self._pairs(e))
        kept: dict[str, str] = {}
        for _, real, path in found:
            first = direct.get(real) or kept.get(real)
            if first is None:
                kept[real] = path
            else:
                self.report.add("duplicates", path, f"same file as {first}")
        return kept

    def by_label(self, n_labels: int) -> list[list[str]]:
        """Images per label in ``os.walk`` order: folders sorted by their path below the label's top (a folder
        before its sub-folders), each folder's files by name; each real file once."""
        kept = self._kept_links()
        out: list[list[str]] = [[] for _ in range(n_labels)]
        folders = sorted(self.folders, key=_FOLDER_ORDER)  # stable: a folder's entries stay together
        i = 0
        while i < len(folders):
            label, rel = folders[i][:2]
            j = i + 1
            while j < len(folders) and folders[j][0] == label and folders[j][1] == rel:
                j += 1
            if j - i == 1 and not folders[i][2]:  # the common case: one folder of plain files, already sorted
                out[label].extend(path for _, path in self._pairs(folders[i]))
            else:  # links to files beside plain files: os.walk sorts them all by name
                paths = [path for k in range(i, j) for real, path in self._pairs(folders[k])
                         if not folders[k][2] or kept.get(real) == path]
                out[label].extend(sorted(paths, key=os.path.basename))
            i = j
        return out


def scan_images(root: str | os.PathLike, extensions: tuple[str, ...] = IMG_EXTENSIONS,
                warn: bool = True) -> tuple[list[str], ScanReport]:
    """Every image under ``root`` (recursively; ``os.walk`` order; links followed at most once, each image once)
    and what was skipped. ``warn``: log the skipped entries once (``logging.warning``)."""
    root = os.fspath(root)
    scanner = _Scanner(root, extensions)
    scanner.mark_visited(root)
    failed = scanner.walk(root, 0)
    if failed:
        raise DataError(f"cannot read the folder {failed}; fix its permissions")
    scanner.drain()
    images = scanner.by_label(1)[0]  # counts the duplicates too
    if warn and scanner.report.skipped:
        logger.warning("%s", scanner.report.summary())
    return images, scanner.report


def scan_class_folders(root: str | os.PathLike, extensions: tuple[str, ...] = IMG_EXTENSIONS,
                       warn: bool = True) -> tuple[list[str], list[list[str]], ScanReport]:
    """ImageFolder scan: ``(classes, images per class, report)``; classes are the sorted sub-folders of ``root``
    (links to folders included, hidden names skipped), images as :func:`scan_images`. An image reachable from two
    classes counts once, in the class where its real file lies. An unreadable class folder, or one that is the same
    folder as another class, raises DataError (dropping it would shift every label after it)."""
    root = os.fspath(root)
    scanner = _Scanner(root, extensions)
    report = scanner.report
    scanner.mark_visited(root)  # a link back to the root is a loop
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot read the data folder {root}: {e.strerror or e}; fix its permissions") from None
    classes = []
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_symlink() and not os.path.exists(e.path):
            report.add("broken", e.path, "class folder link to nothing")
        elif e.is_dir():
            classes.append(e.name)
    seen: dict[tuple[int, int], str] = {}
    for k, cls in enumerate(classes):
        cdir = os.path.join(root, cls)
        st = os.stat(cdir)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise DataError(f"class folders {seen[key]} and {cls} under {root} are the same folder (a link); "
                            f"remove one of them")
        seen[key] = cls
        scanner.visited.add(key)
    for k, cls in enumerate(classes):
        cdir = os.path.join(root, cls)
        failed = scanner.walk(cdir, k)
        if failed:
            raise DataError(f"cannot read the class folder {failed}; fix its permissions or remove the folder")
    scanner.drain()
    per_class = scanner.by_label(len(classes))  # counts the duplicates too
    if warn and report.skipped:
        logger.warning("%s", report.summary())
    return classes, per_class, report


class SafeImageFolder:
    """ImageFolder semantics (classes = sorted sub-folders, images found recursively in sorted order), plus:

    * the folder scan is :func:`scan_class_folders` (links followed once, each image once, one warning counting what
      was skipped; ``scan_report`` keeps the counts);
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
            raise DataError(f"data path {root} does not exist; pass a folder of class folders ({_LAYOUT_HINT}), "
                            f"or omit --data_path to use the embedded dataset")
        if not os.path.isdir(root):
            raise DataError(f"data path {root} is not a directory; {_LAYOUT_HINT}")
        classes, per_class, self.scan_report = scan_class_folders(root, extensions)
        if not classes:
            raise DataError(f"{root} has no class folders; {_LAYOUT_HINT}")
        samples = []
        for k, (cls, files) in enumerate(zip(classes, per_class)):
            if not files:
                raise DataError(f"class folder {os.path.join(root, cls)} contains no images (extensions: "
                                f"{', '.join(extensions)}){_skipped_hint(self.scan_report)}; add images to it or "
                                f"remove the folder")
            if subset > 0:
                files = files[:subset]
            samples.extend((f, k) for f in files)
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


SPLIT_NAMES = ("train", "val")


def list_subfolders(path: str | os.PathLike) -> list[str] | None:
    """Sorted non-hidden sub-folder names of ``path`` (links to folders included); None if it is no readable folder."""
    try:
        with os.scandir(path) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return None


def _has_image_files(path: str, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> bool:
    try:
        with os.scandir(path) as it:
            return any(e.name.lower().endswith(extensions) and e.is_file() for e in it)
    except OSError:
        return False


def resolve_split_root(data_path: str | os.PathLike, split: str) -> str:
    """The ImageFolder root of ``split`` under ``data_path``, for either layout:

    * SimPool's (and DINO's evaluation) layout, ``<data_path>/train/<class>/*.jpg`` (+ ``val/``): chosen when
      ``<data_path>/train`` or ``<data_path>/val`` is a folder that holds sub-folders; the split is
      ``<data_path>/<split>``. Other folders beside them are ignored (a warning names the ones that hold images
      directly, which look like class folders).
    * DINO's pretraining layout, ``--data_path /path/to/imagenet/train``, a folder of class folders: otherwise. It
      is the ``train`` split; it has no ``val`` split (DataError saying what to pass).

    So a class literally named ``train`` (or ``val``) whose images sit directly in it is a class, and such a class
    whose images sit in sub-folders makes the root read as the split layout (the warning then lists the other
    classes): rename it in that case.
    """
    data_path = os.fspath(data_path)
    split_dirs = [s for s in SPLIT_NAMES if list_subfolders(os.path.join(data_path, s))]
    if split_dirs:
        root = os.path.join(data_path, split)
        if not os.path.isdir(root):
            raise DataError(f"{root} does not exist: --data_path {data_path} has {'/, '.join(split_dirs)}/ with "
                            f"class folders in it, so it is read as a root of splits (<data_path>/train/<class>/"
                            f"*.jpg, <data_path>/val/<class>/*.jpg); add the '{split}/' split, or pass a folder of "
                            f"class folders (--data_path /path/to/imagenet/train) for training alone")
        others = [d for d in list_subfolders(data_path) or [] if d not in (*SPLIT_NAMES, "test")
                  and _has_image_files(os.path.join(data_path, d))]
        if others:
            logger.warning("%s has both split folders (%s) and folders with images in them (%s%s): reading %s as the "
                           "'%s' split and ignoring the others. If %s is a class, move its images out of its "
                           "sub-folders or rename it", data_path, ", ".join(split_dirs), ", ".join(others[:5]),
                           ", ..." if len(others) > 5 else "", root, split, split)
        return root
    if split == "train":
        return data_path
    parent = os.path.dirname(os.path.abspath(data_path))
    hint = (f" (here: --data_path {parent})" if os.path.basename(os.path.abspath(data_path)) == "train"
            and os.path.isdir(os.path.join(parent, split)) else "")
    raise DataError(f"--data_path {data_path} is a folder of class folders (DINO's layout, read as the train "
                    f"split): it has no '{split}' split. Pass a folder that holds train/ and {split}/ "
                    f"(<root>/train/<class>/*.jpg, <root>/{split}/<class>/*.jpg){hint}")


def build_dataset(data_path, split, transform=None, subset=-1, image_size=64, images_per_class=None, **synthetic):
    """``data_path=None`` -> the embedded ``SyntheticShapes(split, image_size, images_per_class)``;
    else ``SafeImageFolder(resolve_split_root(data_path, split), transform, subset)``: ``data_path`` is a folder of
    class folders (DINO: ``/path/to/imagenet/train``; the train split only) or a folder with ``train/`` and ``val/``
    (SimPool); :func:`resolve_split_root` says how the two are told apart.

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
                        f"a folder of class folders (<data_path>/<class>/*.jpg) or to a folder with train/ and val/ "
                        f"holding them, or omit it to use the embedded dataset")
    return SafeImageFolder(resolve_split_root(data_path, split), transform=transform, subset=subset)
