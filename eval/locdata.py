"""Images with ground-truth boxes for MaxBoxAccV2 and CorLoc, running a model over them, and the command line both
evaluators share (:func:`run_box_evaluator`).

Sources (boxes are ``[x0, y0, x1, y1]`` pixels of the original image, x1/y1 exclusive, see :mod:`eval.boxes`):

* the embedded dataset (default): ``SyntheticShapes(split)`` with its ``.boxes``;
* an image folder + a JSON file ``{"relative/path.png": [[x0, y0, x1, y1], ...]}``: every image under the folder is
  evaluated; its key is its path relative to the folder, or that path prefixed with the folder's name (so the
  ``boxes.json`` that ``SyntheticShapes.export_imagefolder(root)`` writes at ``root`` works with ``root/val``);
* CUB-200-2011: ``bounding_boxes.txt`` + ``images.txt`` (the folder is ``CUB_200_2011/images``); with
  ``train_test_split.txt`` beside them only the test images are used;
* VOC: a folder with ``Annotations/*.xml`` and ``JPEGImages/`` (or ``--annotations DIR`` and the image folder). As
  LOST (torchvision's ``VOCDetection``), only the ids in ``ImageSets/Main/<image_set>.txt`` (default ``trainval``:
  VOC07 5,011 images, VOC12 11,540) are used when that file exists; ``image_set=None`` (``--image_set all``) or a
  folder without ``ImageSets/`` uses every annotation.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from dino_simpool.checkpoint import CheckpointError
from dino_simpool.cli import print_error
from dino_simpool.data import DataError, SyntheticShapes
from dino_simpool.data.synthetic import LAYOUTS as SYNTHETIC_LAYOUTS
from dino_simpool.data.folder import scan_images
from dino_simpool.evaluation.features import model_device
from dino_simpool.evaluation.images import DEFAULT_MAX_SIZE, input_multiple, model_input_size, to_tensor
from dino_simpool.models.backbones import Backbone

from .boxes import check_gt_boxes, load_boxes_cub, load_boxes_json, load_boxes_voc
from .maps import IMG_SUFFIXES, add_size_args, check_size_args
from .model_args import add_model_args, build_model, resolve_device


@dataclass
class BoxSample:
    name: str
    boxes: list
    load: Callable[[], Image.Image]


def _open(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with Image.open(path) as im:
            return im.convert("RGB")
    return load


def embedded_samples(split: str = "val", image_size: int = 64, per_class: int | None = None,
                     layout: str = "default") -> list[BoxSample]:
    ds = SyntheticShapes(split, image_size=image_size, images_per_class=per_class, layout=layout)
    per = ds.images_per_class
    return [BoxSample(f"{split}/{ds.classes[i // per]}/{i % per:05d}.png", [list(b) for b in ds.boxes[i]],
                      (lambda i=i: ds.image(i))) for i in range(len(ds))]


def folder_json_samples(data_path, boxes_file) -> list[BoxSample]:
    root = Path(data_path)
    if not root.is_dir():
        raise DataError(f"--data_path {root} is not a folder")
    boxes = load_boxes_json(boxes_file)  # DataError naming the file and key
    images = sorted(map(Path, scan_images(root, IMG_SUFFIXES)[0]))  # links followed once, each image once
    if not images:
        raise DataError(f"--data_path {root} has no images")
    out, missing = [], []
    for f in images:
        rel = f.relative_to(root).as_posix()
        key = rel if rel in boxes else f"{root.name}/{rel}"
        if key not in boxes:
            missing.append(rel)
            continue
        out.append(BoxSample(key, boxes[key], _open(f)))
    if missing:
        raise DataError(f"{len(missing)} image(s) under {root} have no entry in {boxes_file} (first: {missing[0]}); "
                          f"keys are paths relative to --data_path (or prefixed with its folder name)")
    return out


def cub_samples(data_path, boxes_file, images_txt=None) -> list[BoxSample]:
    root = Path(data_path)
    boxes_file = Path(boxes_file)
    images_txt = Path(images_txt) if images_txt else boxes_file.parent / "images.txt"
    if not images_txt.is_file():
        raise DataError(f"CUB boxes need images.txt: {images_txt} is missing (pass --images_txt)")
    boxes = load_boxes_cub(boxes_file, images_txt)
    split_file = boxes_file.parent / "train_test_split.txt"
    if split_file.is_file():
        ids = {}
        for line in images_txt.read_text().splitlines():
            if line.strip():
                i, p = line.split(maxsplit=1)
                ids[p.strip()] = i
        test = {ln.split()[0] for ln in split_file.read_text().splitlines() if ln.strip() and ln.split()[1] == "0"}
        boxes = {k: v for k, v in boxes.items() if ids.get(k) in test}
    out = []
    for key in sorted(boxes):
        f = root / key
        if not f.is_file():
            raise DataError(f"{f} (listed in {images_txt}) does not exist; --data_path is CUB's images/ folder")
        out.append(BoxSample(key, boxes[key], _open(f)))
    return out


def voc_samples(data_path, annotations=None, image_set: str | None = "trainval") -> list[BoxSample]:
    """VOC images and boxes; ``image_set``: the ids of ``ImageSets/Main/<image_set>.txt`` (beside ``Annotations/``)
    when it exists; ``None`` = every annotation. The default ``trainval`` falls back to every annotation when the
    folder has no such list; any other name must exist."""
    root = Path(data_path)
    if annotations is None:
        if not (root / "Annotations").is_dir():
            raise DataError(f"{root} is not a VOC folder (no Annotations/); pass --annotations DIR or --boxes FILE.json")
        annotations, images = root / "Annotations", root / "JPEGImages"
    else:
        images = root
    ids = None
    if image_set:
        set_file = Path(annotations).parent / "ImageSets" / "Main" / f"{image_set}.txt"
        if set_file.is_file():
            ids = [ln.split()[0] for ln in set_file.read_text().splitlines() if ln.strip()]
            if not ids:
                raise DataError(f"{set_file} lists no image")
        elif image_set != "trainval":
            raise DataError(f"--image_set {image_set}: {set_file} does not exist (use --image_set all for every "
                              f"annotation)")
    try:
        boxes = load_boxes_voc(annotations, ids)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    out = []
    for name in sorted(boxes):
        f = Path(images) / name
        if not f.is_file():
            raise DataError(f"image {f} of annotation {name} does not exist")
        out.append(BoxSample(name, boxes[name], _open(f)))
    return out


def check_samples(samples: list[BoxSample], subset: int = -1) -> list[BoxSample]:
    if subset is not None and subset > 0:
        samples = samples[:subset]
    if not samples:
        raise DataError("no image to evaluate")
    for s in samples:
        check_gt_boxes(s.boxes, s.name)
    return samples


def iterate(model, samples: list[BoxSample], image_size: int | None = None, batch_size: int = 32,
            max_size: int | None = DEFAULT_MAX_SIZE) -> Iterator:
    """Yields (x (B, 3, H, W) on the model's device, [(sample, (H0, W0) original size)]) with images of one input
    size per batch (consecutive images of equal size are batched). Input size: :func:`dino_simpool.evaluation.images.model_input_size`."""
    device = model_device(model)
    mult = input_multiple(model)
    batch: list[torch.Tensor] = []
    meta: list = []
    cur = None
    for s in samples:
        img = s.load()
        size = model_input_size((img.height, img.width), mult, image_size, max_size)
        if batch and (size != cur or len(batch) >= batch_size):
            yield torch.stack(batch).to(device), meta
            batch, meta = [], []
        cur = size
        batch.append(to_tensor(img, size))
        meta.append((s, (img.height, img.width)))
    if batch:
        yield torch.stack(batch).to(device), meta


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def add_box_evaluator_args(p: argparse.ArgumentParser, results_file: str) -> None:
    """The flags that MaxBoxAccV2 and CorLoc share (:func:`run_box_evaluator` reads them): the model, the embedded
    dataset, the input size, the batch, a subset and where ``results_file`` goes."""
    add_model_args(p, device=True, seed=True)
    p.add_argument("--synthetic_size", default=64, type=int, help="embedded dataset image size")
    p.add_argument("--synthetic_per_class", default=None, type=int, help="embedded val images per class (default 50)")
    p.add_argument("--synthetic_layout", default="default", choices=list(SYNTHETIC_LAYOUTS),
                   help="embedded dataset layout: default (large, near-centre objects: a centre prior scores high) or "
                        "cluttered (objects anywhere, at any scale, on clutter; benchmarks/localization.py)")
    add_size_args(p)
    p.add_argument("--batch_size", default=32, type=int)
    p.add_argument("--subset", default=-1, type=int, help="evaluate only the first N images")
    p.add_argument("--output_dir", default=None, help=f"write {results_file} here")


def run_box_evaluator(prog: str, args: argparse.Namespace, check: Callable[[], None],
                      load_samples: Callable[[argparse.Namespace], list[BoxSample]],
                      evaluate: Callable[[Backbone, list[BoxSample]], dict], summary: Callable[[dict], str],
                      results_file: str) -> int:
    """The command line of MaxBoxAccV2 and CorLoc once its flags are parsed: check them, load the boxes and the model,
    evaluate, print one summary line and write ``<output_dir>/<results_file>``. Bad input: one line, exit 2."""
    try:
        check_size_args(args)
        check()
        samples = load_samples(args)
        model = build_model(args, resolve_device(args.device))
        res = evaluate(model, samples)
    except (CheckpointError, ValueError, OSError) as e:  # DataError is a ValueError
        print_error(prog, e)
        return 2
    res.update(data=args.data_path or f"embedded val ({args.synthetic_size}px, {args.synthetic_layout} layout)",
               model=args.pretrained_weights or "random init", arch=model.config["arch"],
               pooling=model.config["pooling"])
    print(summary(res))
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / results_file).write_text(json.dumps(res, indent=2) + "\n")
    return 0
