"""Feature dumps of ``dino-simpool-knn``: ``--dump_features`` writes, ``--load_features`` reads (safetensors or .npy).

The features themselves come from :func:`dino_simpool.evaluation.features.extract_features`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FEATURES_FILE = "features.safetensors"
CLASSES_FILE = "classes.json"
KEYS = ("train_feats", "train_labels", "test_feats", "test_labels")
# .npy names we read: ours, then DINO's dump names (DINO writes .pth; converted dumps often keep the stem)
NPY_NAMES = {
    "train_feats": ("train_feats.npy", "trainfeat.npy"),
    "train_labels": ("train_labels.npy", "trainlabels.npy"),
    "test_feats": ("test_feats.npy", "testfeat.npy"),
    "test_labels": ("test_labels.npy", "testlabels.npy"),
}


def save_features(out_dir: str | os.PathLike, train_feats: torch.Tensor, train_labels: torch.Tensor,
                  test_feats: torch.Tensor, test_labels: torch.Tensor, classes: Sequence[str] | None = None,
                  fmt: str = "safetensors") -> Path:
    """Write features and labels (``features.safetensors``, or four ``.npy`` files) plus ``classes.json``."""
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
    elif fmt == "npy":
        for k, v in tensors.items():
            np.save(out / NPY_NAMES[k][0], v.numpy())
    else:
        raise ValueError(f"dump format must be 'safetensors' or 'npy'; got {fmt!r}")
    (out / CLASSES_FILE).write_text(json.dumps({"classes": list(classes) if classes is not None else None}) + "\n")
    return out


def load_features(in_dir: str | os.PathLike) -> dict:
    """Read what :func:`save_features` wrote (safetensors first, else .npy). Raises ValueError on a bad folder."""
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
    else:
        for k in KEYS:
            path = next((d / name for name in NPY_NAMES[k] if (d / name).is_file()), None)
            if path is None:
                raise ValueError(f"--load_features {d}: found neither {FEATURES_FILE} nor {' / '.join(NPY_NAMES[k])}")
            bundle[k] = torch.from_numpy(np.load(path, allow_pickle=False))
    bundle["train_feats"] = bundle["train_feats"].float()
    bundle["test_feats"] = bundle["test_feats"].float()
    bundle["train_labels"] = bundle["train_labels"].long()
    bundle["test_labels"] = bundle["test_labels"].long()
    cpath = d / CLASSES_FILE
    bundle["classes"] = json.loads(cpath.read_text()).get("classes") if cpath.is_file() else None
    return bundle
