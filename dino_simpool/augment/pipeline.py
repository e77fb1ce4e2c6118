"""``build_multicrop``: the one entry point training uses for DINO's multi-crop, whichever pipeline runs it.

Pipelines (``--aug_pipeline``):

* ``cpu``: the loader workers run both stages (``backend="fast"``: stage 1 per image, stage 2 on the worker's whole
  batch in ``collate_fn``) or the stock torchvision.transforms.v2 recipe per image (``backend="v2"``); the batch
  reaches the step as float crops.
* ``device``: the workers run stage 1 (decode, parameters, uint8 crops); the training device runs stage 2 on the
  whole batch (``ColorStage``). The default on CUDA.
* ``device_decode``: the workers read the JPEG bytes and draw the parameters; the device decodes (nvjpeg on CUDA),
  cuts the crops and runs stage 2. Non-JPEG files are decoded by the workers.

All three draw every random number in the workers from the per-sample seeded generator (``SeededDataset``), so a
run is reproducible and a resumed run bit-identical on CPU, whatever the pipeline.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import default_collate

from .decode import DeviceCrops, EncodedCropStage, EncodedLoader
from .recipe import IMAGENET_MEAN, IMAGENET_STD, Recipe
from .reference import V2MultiCrop
from .stage1 import CropStage, ImageLoader
from .stage2 import ColorStage

PIPELINES = ("cpu", "device", "device_decode")
BACKENDS = ("fast", "v2")
# Fastest on a CPU-only machine, measured with benchmarks/train_step.py (benchmarks/README.md): the workers run
# stage 2 while the main process runs the step.
CPU_DEFAULT_PIPELINE = "cpu"


def default_pipeline(device_type: str) -> str:
    """``device`` on CUDA (stage 2 on the GPU), the fastest measured pipeline on CPU."""
    return "device" if device_type == "cuda" else CPU_DEFAULT_PIPELINE


class TwoStageCrops:
    """Both stages in the loader worker, per image: ``img -> list of (3, S, S) float32 crops`` (backend ``fast``)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.stage1 = CropStage(recipe)
        self.stage2 = ColorStage(recipe)

    def __call__(self, img) -> list[torch.Tensor]:
        s1 = self.stage1(img)
        crops = self.stage2([c[None] for c in s1["crops"]], s1["params"][None])
        return [c[0] for c in crops]


class CollateStage2:
    """DataLoader ``collate_fn`` of the ``cpu`` pipeline: collate the stage-1 samples, then run stage 2 on the whole
    batch in the worker (one batched call per crop size instead of two per image: per-op overhead dominates small
    crops). Items are ``(stage-1 dict, label, ...)``; the result is ``[crops, labels, ...]``."""

    def __init__(self, stage2: ColorStage):
        self.stage2 = stage2

    def __call__(self, samples):
        images, *rest = default_collate(samples)
        return [self.stage2(images["crops"], images["params"]), *rest]


class MultiCropPipeline:
    """What the trainer needs: ``transform`` (the dataset's), ``loader`` (the image folder's file loader),
    ``collate_fn`` (the DataLoader's; None = the default) and ``to_device(batch, device) -> list of crops`` (the
    step's input: ncrops float32 tensors (B, 3, S, S))."""

    def __init__(self, recipe: Recipe, pipeline: str, backend: str = "fast"):
        self.recipe, self.pipeline, self.backend = recipe, pipeline, backend
        self.loader: Callable[[Any], Any] = ImageLoader()
        self.stage2: ColorStage | None = None
        self.device_crops: DeviceCrops | None = None
        self.collate_fn: Callable[[list], Any] | None = None
        if pipeline == "cpu" and backend == "v2":
            self.transform: Callable[[Any], Any] = V2MultiCrop(recipe)
        elif pipeline == "cpu":
            self.transform, self.collate_fn = CropStage(recipe), CollateStage2(ColorStage(recipe))
        elif pipeline == "device":
            self.transform, self.stage2 = CropStage(recipe), ColorStage(recipe)
        else:
            self.transform, self.stage2 = EncodedCropStage(recipe), ColorStage(recipe)
            self.loader, self.device_crops = EncodedLoader(), DeviceCrops(recipe)

    def prepare_dataset(self, dataset):
        """Give an image folder this pipeline's file loader (the embedded dataset makes its own images)."""
        if hasattr(dataset, "loader") and hasattr(dataset, "samples"):
            dataset.loader = self.loader
        return dataset

    def to_device(self, batch, device: torch.device) -> list[torch.Tensor]:
        """The loader's batch -> the step's crops on ``device`` (stage 2 for the device pipelines)."""
        if self.pipeline == "cpu":
            return [im.to(device, non_blocking=True) for im in batch]
        if self.device_crops is not None:
            crops = self.device_crops(batch, device)
        else:
            crops = [c.to(device, non_blocking=True) for c in batch["crops"]]
        return self.stage2(crops, batch["params"])  # type: ignore[misc]

    def __repr__(self):
        return f"MultiCropPipeline({self.pipeline}, backend={self.backend}, {self.recipe})"


def build_multicrop(global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number: int = 8,
                    global_size: int = 224, local_size: int = 96, pipeline: str | None = None,
                    device: torch.device | str = "cpu", backend: str = "fast", mean=IMAGENET_MEAN,
                    std=IMAGENET_STD, blur_sigma=(0.1, 2.0)) -> MultiCropPipeline:
    """DINO's multi-crop for training on ``device``: ``pipeline`` one of ``PIPELINES`` or None/"auto" for
    ``default_pipeline(device.type)`` (``cpu`` with ``backend="v2"``); ``backend`` (``fast`` / ``v2``) is the ``cpu``
    pipeline's implementation."""
    if pipeline in (None, "auto"):  # the stock v2 recipe runs per image in the workers only
        pipeline = "cpu" if backend == "v2" else default_pipeline(torch.device(device).type)
    if pipeline not in PIPELINES:
        raise ValueError(f"--aug_pipeline must be one of {', '.join(PIPELINES)} (or auto), got {pipeline!r}")
    if backend not in BACKENDS:
        raise ValueError(f"--aug_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "v2" and pipeline != "cpu":
        raise ValueError(f"--aug_backend v2 (stock torchvision transforms) runs only with --aug_pipeline cpu, "
                         f"got --aug_pipeline {pipeline}; pass --aug_backend fast or --aug_pipeline cpu")
    recipe = Recipe(global_crops_scale, local_crops_scale, local_crops_number, global_size, local_size,
                    mean=mean, std=std, blur_sigma=blur_sigma)
    return MultiCropPipeline(recipe, pipeline, backend)
