"""DINO's multi-crop augmentation as a two-stage pipeline.

* ``recipe``: the recipe as data (``Recipe``) and the stage-1 sampler of every random parameter (``sample_params``).
* ``stage1``: loader workers, CPU: decode, parameters, uint8 crops (``CropStage``, ``ImageLoader``).
* ``stage2``: the training device, batched and deterministic: colour, blur, solarize, normalise (``ColorStage``).
* ``decode``: device decode of JPEG bytes and antialiased crops cut on the device.
* ``reference``: the same recipe from stock torchvision.transforms.v2 transforms.
* ``pipeline``: ``build_multicrop``, what training calls.
"""
from .pipeline import (BACKENDS, CPU_DEFAULT_PIPELINE, PIPELINES, MultiCropPipeline, TwoStageCrops, build_multicrop,
                       default_pipeline)
from .recipe import IMAGENET_MEAN, IMAGENET_STD, NPARAMS, Recipe, sample_params
from .stage1 import CropStage, ImageLoader
from .stage2 import ColorStage

__all__ = ["BACKENDS", "CPU_DEFAULT_PIPELINE", "PIPELINES", "MultiCropPipeline", "TwoStageCrops", "build_multicrop",
           "default_pipeline", "IMAGENET_MEAN", "IMAGENET_STD", "NPARAMS", "Recipe", "sample_params", "CropStage",
           "ImageLoader", "ColorStage"]
