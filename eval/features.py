"""Feature dumps of ``dino-simpool-knn``: ``--dump_features`` writes, ``--load_features`` reads.

Three formats, each with ``classes.json`` beside it (the class names, or null):

* ``safetensors`` (default): ``features.safetensors`` holding ``train_feats``, ``train_labels``, ``test_feats``,
  ``test_labels``;
* ``dino``: DINO's own dump, four ``torch.save``'d tensors ``trainfeat.pth``, ``testfeat.pth``, ``trainlabels.pth``,
  ``testlabels.pth`` (what DINO's ``eval_knn.py --dump_features`` writes and ``--load_features`` reads); read back
  with ``torch.load(weights_only=True)``, so a dump can carry nothing but tensors;
* ``npy``: four ``.npy`` files (``train_feats.npy``...; DINO's stems ``trainfeat.npy``... are read too).

The features themselves come from :func:`dino_simpool.evaluation.features.extract_features`.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dino_simpool.checkpoint import save_atomic

FEATURES_FILE = "features.safetensors"
CLASSES_FILE = "classes.json"
KEYS = ("train_feats", "train_labels", "test_feats", "test_labels")
DUMP_FORMATS = ("safetensors", "dino", "npy")
# DINO's eval_knn.py dump: torch.save'd tensors under these names
DINO_NAMES = {"train_feats": "trainfeat.pth", "train_labels": "trainlabels.pth",
              "test_feats": "testfeat.pth", "test_labels": "testlabels.pth"}
# .npy names we read: ours, then DINO's dump names (converted dumps often keep DINO's stem)
NPY_NAMES = {
    "train_feats": ("train_feats.npy", "trainfeat.npy"),
    "train_labels": ("train_labels.npy", "trainlabels.npy"),
    "test_feats": ("test_feats.npy", "testfeat.npy"),
    "test_labels": ("test_labels.npy", "testlabels.npy"),
}


def save_features(out_dir: str | os.PathLike, train_feats: torch.Tensor, train_labels: torch.Tensor,
                  test_feats: torch.Tensor, test_labels: torch.Tensor, classes: Sequence[str] | None = None,
                  fmt: str = "safetensors") -> Path:
    """Write features and labels in ``fmt`` (:data:`DUMP_FORMATS`, module docstring) plus ``classes.json``."""
    if fmt not in DUMP_FORMATS:
        raise ValueError(f"dump format must be one of {', '.join(DUMP_FORMATS)}; got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        "train_feats": train_feats.detach().float().cpu().contiguous(),
        "train_labels": torch.as_tensor(train_labels).long().cpu().contiguous(),
        "test_feats": test_feats.detach().float().cpu().contiguous(),
        "test_labels": torch.as_tensor(test_labels).long().cpu().contiguous(),
    }
    if fmt == "safetensors":
        save_file(tensors, str(out / FEATURES_FILE))
    elif fmt == "dino":
        for k, v in tensors.items():
            save_atomic(v, out / DINO_NAMES[k])
    else:
        for k, v in tensors.items():
            np.save(out / NPY_NAMES[k][0], v.numpy())
    (out / CLASSES_FILE).write_text(json.dumps({"classes": list(classes) if classes is not None else None}) + "\n")
    return out


def _load_pth(path: Path) -> torch.Tensor:
    """One tensor of a DINO dump, read with ``weights_only=True``; ValueError naming the file otherwise."""
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} as a torch.save'd tensor (DINO's dump format): "
                         f"{' '.join(str(e).split())[:300]}") from None
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{path} holds a {type(t).__name__}, not a tensor; DINO's dump files hold one tensor each")
    return t


def load_features(in_dir: str | os.PathLike) -> dict:
    """Read a dump (safetensors first, else DINO's ``.pth`` files, else ``.npy``). Raises ValueError on a bad folder
    or a tensor of the wrong shape or type."""
    d = Path(in_dir)
    if not d.is_dir():
        raise ValueError(f"--load_features {d}: no such folder")
    bundle: dict = {}
    st = d / FEATURES_FILE
    if st.is_file():
        try:
            data = load_file(str(st))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read {st}: {e}") from None
        missing = [k for k in KEYS if k not in data]
        if missing:
            raise ValueError(f"{st} lacks {missing}; it was not written by --dump_features")
        bundle.update({k: data[k] for k in KEYS})
    elif any((d / name).is_file() for name in DINO_NAMES.values()):
        missing = [name for name in DINO_NAMES.values() if not (d / name).is_file()]
        if missing:
            raise ValueError(f"--load_features {d}: DINO's dump needs {' '.join(DINO_NAMES.values())}; missing "
                             f"{' '.join(missing)}")
        bundle.update({k: _load_pth(d / name) for k, name in DINO_NAMES.items()})
    else:
        for k in KEYS:
            path = next((d / name for name in NPY_NAMES[k] if (d / name).is_file()), None)
            if path is None:
                raise ValueError(f"--load_features {d}: found neither {FEATURES_FILE}, DINO's "
                                 f"{DINO_NAMES[k]} nor {' / '.join(NPY_NAMES[k])}")
            bundle[k] = torch.from_numpy(np.load(path, allow_pickle=False))
    for split in ("train", "test"):
        f, y = bundle[f"{split}_feats"], bundle[f"{split}_labels"]
        if f.ndim != 2 or not f.is_floating_point():
            raise ValueError(f"--load_features {d}: {split} features must be a 2-D float tensor; got "
                             f"{tuple(f.shape)} {f.dtype}")
        if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"--load_features {d}: {split} labels must be a 1-D integer tensor; got "
                             f"{tuple(y.shape)} {y.dtype}")
    bundle["train_feats"] = bundle["train_feats"].float()
    bundle["test_feats"] = bundle["test_feats"].float()
    bundle["train_labels"] = bundle["train_labels"].long()
    bundle["test_labels"] = bundle["test_labels"].long()
    cpath = d / CLASSES_FILE
    bundle["classes"] = json.loads(cpath.read_text()).get("classes") if cpath.is_file() else None
    return bundle
