"""Weighted k-NN classification on frozen features (DINO's protocol), with one faiss search for every k.

Library: :func:`knn_classify` is what training's periodic evaluation calls. Command line: :func:`main`
(``dino-simpool-knn`` / ``python -m eval.knn``), compatible with DINO's and SimPool's ``eval_knn.py`` flags.

The protocol (identical to DINO's ``knn_classifier``):

* train ("bank") and test features are L2-normalised in fp32; the similarity is the inner product (cosine);
* for each test image the k most similar train images vote for their class with weight ``exp(sim / T)``;
* top-1: the class with the largest summed weight is the label; top-5: the label is among the first ``min(5, k)``
  classes sorted by summed weight (DINO issue #89). Classes that got no vote have score 0 and still take part in
  the sort, exactly as in DINO.

What differs from DINO, and why the numbers are still DINO's:

* one search with ``max(k)`` neighbours serves every k (the first k of the ``max(k)`` sorted neighbours are the
  k nearest ones); DINO recomputes the similarities for every k;
* the number of classes comes from the train labels (``max + 1``), not a hard-coded 1000; fewer than 5 classes and
  fewer than 100 test images work;
* a k larger than the bank is clamped to the bank size with a warning (DINO's ``topk`` raises); the result is
  still reported under the k that was asked for.

Ties (documented, not hidden):

* two classes with exactly the same summed weight: the lower class id ranks first (a stable sort; DINO's sort
  leaves this unspecified);
* two train images with exactly the same similarity at the k-th place: which one is kept depends on the search
  backend (faiss vs torch ``topk``), as in any exact k-NN. With real-valued features this needs bit-identical
  similarities and does not happen in practice; tests use random features where it cannot happen.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from dino_simpool.data.folder import list_subfolders
from dino_simpool.dino.config import bool_flag, float_or_none

DEFAULT_KS = (10, 20, 100, 200)
GPU_MAX_K = 2048  # faiss GPU k-selection limit
BACKENDS = ("faiss", "torch")
_UNSET = object()  # --gamma not given: the checkpoint's (or build_backbone's) default applies


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation in fp32 (DINO: ``nn.functional.normalize(x, dim=1, p=2)``)."""
    return F.normalize(x.float(), dim=1, p=2)


def _check_ks(ks: Iterable[int]) -> list[int]:
    out: list[int] = []
    for k in ks:
        if isinstance(k, bool) or int(k) != k or int(k) <= 0:
            raise ValueError(f"every k in --nb_knn must be a positive integer; got {k!r}")
        if int(k) not in out:
            out.append(int(k))
    if not out:
        raise ValueError("--nb_knn needs at least one k (DINO's default is 10 20 100 200)")
    return out


def _check_inputs(train_feats, train_labels, test_feats, test_labels, T, num_classes):
    if not (isinstance(T, (int, float)) and T > 0 and math.isfinite(T)):
        raise ValueError(f"the temperature T must be a positive number; got {T!r}")
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError(f"features must be 2-D (N, d); got train {tuple(train_feats.shape)}, test {tuple(test_feats.shape)}")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train features have dim {train_feats.shape[1]} but test features have dim {test_feats.shape[1]}; "
                         f"they must come from the same model")
    if train_feats.shape[0] == 0:
        raise ValueError("the train bank is empty: k-NN needs at least one train feature")
    if test_feats.shape[0] == 0:
        raise ValueError("there are no test features to classify")
    train_labels = torch.as_tensor(train_labels).reshape(-1).long().cpu()
    test_labels = torch.as_tensor(test_labels).reshape(-1).long().cpu()
    if len(train_labels) != train_feats.shape[0]:
        raise ValueError(f"{train_feats.shape[0]} train features but {len(train_labels)} train labels")
    if len(test_labels) != test_feats.shape[0]:
        raise ValueError(f"{test_feats.shape[0]} test features but {len(test_labels)} test labels")
    if int(train_labels.min()) < 0:
        raise ValueError(f"train labels must be >= 0; found {int(train_labels.min())}")
    n_cls = int(train_labels.max()) + 1
    if num_classes is not None:
        if int(num_classes) < n_cls:
            raise ValueError(f"num_classes={num_classes} but the train labels go up to {n_cls - 1}")
        n_cls = int(num_classes)
    bad = (test_labels < 0) | (test_labels >= n_cls)
    if bool(bad.any()):
        raise ValueError(f"test label {int(test_labels[bad][0])} is not a train class (train classes are 0..{n_cls - 1}); "
                         f"every test class must appear in the train set")
    return train_labels, test_labels, n_cls


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support, sees a GPU, and torch sees CUDA."""
    try:
        import faiss
    except ImportError:
        return False
    return (hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available()
            and faiss.get_num_gpus() > 0)


# ----------------------------------------------------------------------------------------------------------------
# search backends: each yields (start, sims (B, K) fp32 cpu, idx (B, K) int64 cpu) per query chunk
# ----------------------------------------------------------------------------------------------------------------
def is_unit_norm(x: torch.Tensor, tol: float = 1e-5, chunk: int = 16384) -> bool:
    """True when ``x`` is fp32 and every row already has unit L2 norm (checked in chunks, no full-size temporary)."""
    if x.dtype != torch.float32:
        return False
    for s in range(0, x.shape[0], chunk):
        norms = torch.linalg.vector_norm(x[s:s + chunk], dim=1)
        if not bool(((norms - 1).abs() <= tol).all()):
            return False
    return True


class _FaissSearcher:
    """Exact inner-product faiss search over the normalised bank.

    * GPU: ``GpuIndexFlatIP`` (optionally fp16 storage), memory reserved for the whole bank, filled in chunks.
    * CPU, bank already unit-norm fp32 contiguous (what ``main()`` and the dump files hold): no copy at all;
      ``faiss.knn`` (the kernel behind ``IndexFlatIP.search``) reads the caller's memory.
    * CPU otherwise: ``IndexFlatIP`` whose storage is sized once for the whole bank and filled chunk by chunk with
      normalised rows (``index.add`` in chunks would grow its buffer geometrically, up to 2x the bank at the last
      reallocation); falls back to chunked ``add`` if this faiss build does not expose the storage.
    """

    def __init__(self, train_feats: torch.Tensor, use_gpu: bool, fp16_bank: bool = False, add_chunk: int = 16384,
                 gpu_device: int | None = None):
        import faiss
        import numpy as np

        self.faiss = faiss
        n, d = train_feats.shape
        self.res = None
        self.index = None
        self.bank_np = None
        self.mode = ""
        if use_gpu:
            dev = torch.cuda.current_device() if gpu_device is None else int(gpu_device)
            self.res = faiss.StandardGpuResources()  # keep a reference: the index uses it until it is freed
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device = dev
            cfg.useFloat16 = bool(fp16_bank)
            self.index = faiss.GpuIndexFlatIP(self.res, d, cfg)
            if hasattr(self.index, "reserveMemory"):
                self.index.reserveMemory(n)
            for s in range(0, n, add_chunk):
                self.index.add(l2_normalize(train_feats[s:s + add_chunk]).cpu().contiguous().numpy())
            self.mode = f"GpuIndexFlatIP(device {dev}{', fp16 bank' if fp16_bank else ''})"
            return
        if fp16_bank:
            warnings.warn("fp16_bank applies to the GPU faiss index only; the CPU search uses fp32", stacklevel=3)
        if train_feats.device.type == "cpu" and train_feats.is_contiguous() and is_unit_norm(train_feats):
            self.bank_np = train_feats.detach().numpy()  # a view: no copy
            self.mode = "faiss.knn on the caller's (already normalised) bank, zero-copy"
            return
        self.index = faiss.IndexFlatIP(d)
        try:
            nbytes = n * d * 4
            self.index.codes.resize(nbytes)
            store = faiss.rev_swig_ptr(self.index.codes.data(), nbytes).view(np.float32).reshape(n, d)
            for s in range(0, n, add_chunk):
                store[s:s + add_chunk] = l2_normalize(train_feats[s:s + add_chunk]).cpu().numpy()
            self.index.ntotal = n
            self.mode = "IndexFlatIP (preallocated, filled in chunks)"
        except (AttributeError, TypeError):  # pragma: no cover - older faiss without MaybeOwnedVector/rev_swig_ptr
            self.index = faiss.IndexFlatIP(d)
            for s in range(0, n, add_chunk):
                self.index.add(l2_normalize(train_feats[s:s + add_chunk]).cpu().contiguous().numpy())
            self.mode = "IndexFlatIP (chunked add)"

    def search(self, queries: torch.Tensor, k: int):
        q = l2_normalize(queries).cpu().contiguous().numpy()
        if self.index is None:
            sims, idx = self.faiss.knn(q, self.bank_np, k, metric=self.faiss.METRIC_INNER_PRODUCT)
        else:
            sims, idx = self.index.search(q, k)
        return torch.from_numpy(sims), torch.from_numpy(idx)

    def close(self):
        if self.index is not None:
            self.index.reset()
        self.index = self.bank_np = self.res = None


class _TorchSearcher:
    """Plain brute force: similarity = queries @ bankᵀ, then ``topk`` (the reference backend)."""

    def __init__(self, train_feats: torch.Tensor, device: torch.device):
        bank = train_feats.to(device)
        self.bank = bank if is_unit_norm(bank) else l2_normalize(bank)  # same rule as the faiss path
        self.device = device

    def search(self, queries: torch.Tensor, k: int):
        q = l2_normalize(queries.to(self.device))
        sims, idx = torch.topk(q @ self.bank.T, k, dim=1, largest=True, sorted=True)
        return sims.cpu(), idx.cpu()

    def close(self):
        del self.bank


# ----------------------------------------------------------------------------------------------------------------
# the vote
# ----------------------------------------------------------------------------------------------------------------
def vote(sims: torch.Tensor, nbr_labels: torch.Tensor, ks: Sequence[int], T: float, num_classes: int,
         ) -> dict[int, torch.Tensor]:
    """DINO's weighted vote for every k from one sorted ``max(k)`` neighbour list.

    ``sims``/``nbr_labels``: (B, K), neighbours sorted by decreasing similarity. A k above K (a bank smaller than k)
    votes with all K neighbours but still reports ``min(5, k, C)`` predictions, as DINO's vote would with that k.
    Returns ``{k: (B, min(5, k, C)) predicted classes, best first}``. Per-class sums are accumulated in float64
    from DINO's fp32 weights ``exp(sim / T)``; ties between classes go to the lower class id.
    """
    w = torch.exp(sims.float() / T).double()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64, device=sims.device)
    out: dict[int, torch.Tensor] = {}
    prev = 0
    for k in sorted(set(ks)):
        n = min(k, sims.shape[1])
        if n > prev:
            scores.scatter_add_(1, nbr_labels[:, prev:n], w[:, prev:n])
            prev = n
        m = min(5, k, num_classes)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        out[k] = order[:, :m].clone()
    return out


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    T: float = 0.07,
    backend: str = "faiss",
    num_classes: int | None = None,
    *,
    use_gpu: bool | None = None,
    fp16_bank: bool = False,
    query_chunk: int | None = None,
    add_chunk: int = 16384,
    device: torch.device | str | None = None,
    return_predictions: bool = False,
):
    """Weighted k-NN accuracy, DINO's protocol. Returns ``{k: (top1, top5)}`` in percent (Python floats).

    Args:
        train_feats, test_feats: (N, d) features, any float dtype/device; L2-normalised in fp32 inside.
        train_labels, test_labels: (N,) integer class ids. Classes are ``0 .. max(train_labels)`` (or
            ``num_classes``); a test label outside them raises ``ValueError``.
        ks: the k values; one search with ``max(k)`` serves all. A k larger than the bank is clamped with a warning.
        T: the temperature of the ``exp(sim / T)`` vote weights.
        backend: ``"faiss"`` (exact ``IndexFlatIP``; the GPU index when faiss has GPU support, a GPU is visible and
            torch sees CUDA) or ``"torch"`` (plain brute force, the reference).
        use_gpu: faiss only: ``None`` = auto (above); ``True`` requires the GPU index; ``False`` forces the CPU one.
        fp16_bank: store the bank in fp16 on the GPU (faiss GPU only; halves bank memory, similarities then carry
            fp16 rounding).
        query_chunk: queries searched per call (default: 8192 for faiss; for torch, as many as keep the (B, N)
            similarity block near 256 MB).
        add_chunk: bank rows normalised and written to the faiss index per step.
        A bank that is already unit-norm fp32 (row norms within 1e-5 of 1) is used as is by both backends (no copy);
        anything else is normalised once (one fp32 copy, inside the index for faiss).
        device: torch backend only: where to compute (default: the train features' device).
        return_predictions: also return ``{k: (N_test, min(5, k, C)) int64}`` predicted classes.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    ks = _check_ks(ks)
    train_labels, test_labels, n_cls = _check_inputs(train_feats, train_labels, test_feats, test_labels, T, num_classes)
    n_bank, n_test = train_feats.shape[0], test_feats.shape[0]

    for k in ks:
        if k > n_bank:
            warnings.warn(f"k={k} is larger than the train bank ({n_bank} features); using all {n_bank} as neighbours "
                          f"(reported under k={k})", stacklevel=2)
    kmax = min(max(ks), n_bank)

    if backend == "faiss":
        gpu_ok = faiss_gpu_available()
        if use_gpu and not gpu_ok:
            raise ValueError("use_gpu=True but faiss has no GPU support here (or no CUDA GPU is visible); install a GPU "
                             "faiss build (pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12) or use the CPU index")
        gpu = gpu_ok if use_gpu is None else bool(use_gpu)
        if gpu and kmax > GPU_MAX_K:
            warnings.warn(f"max k={kmax} exceeds faiss GPU's limit of {GPU_MAX_K}; searching on the CPU index", stacklevel=2)
            gpu = False
        searcher = _FaissSearcher(train_feats, use_gpu=gpu, fp16_bank=fp16_bank, add_chunk=add_chunk)
        chunk = query_chunk or 8192
    else:
        dev = torch.device(device) if device is not None else train_feats.device
        searcher = _TorchSearcher(train_feats, dev)
        chunk = query_chunk or max(1, (1 << 26) // n_bank)

    labels_dev = train_labels
    correct1 = {k: 0 for k in ks}
    correct5 = {k: 0 for k in ks}
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    try:
        for s in range(0, n_test, chunk):
            sims, idx = searcher.search(test_feats[s:s + chunk], kmax)
            if bool((idx < 0).any()):  # faiss pads with -1 when it finds fewer than k results
                raise RuntimeError("the faiss index returned fewer neighbours than asked; this is a bug, please report it")
            nbr = labels_dev[idx]
            tgt = test_labels[s:s + chunk].view(-1, 1)
            # vote in sub-chunks: the (rows, classes) score/sort buffers stay ~10 MB even for 1000 classes
            sub = max(1, (1 << 20) // n_cls)
            parts = [vote(sims[v:v + sub], nbr[v:v + sub], ks, T, n_cls) for v in range(0, sims.shape[0], sub)]
            for k in ks:
                p = torch.cat([b[k] for b in parts])
                correct1[k] += int((p[:, :1] == tgt).sum())
                correct5[k] += int((p == tgt).any(dim=1).sum())
                if return_predictions:
                    preds[k].append(p)
    finally:
        searcher.close()

    results = {k: (100.0 * correct1[k] / n_test, 100.0 * correct5[k] / n_test) for k in ks}
    if return_predictions:
        return results, {k: torch.cat(v) for k, v in preds.items()}
    return results


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "dino-simpool-knn",
        description="Weighted k-NN evaluation of a (DINO/SimPool) backbone, DINO's protocol, faiss search.",
    )
    p.add_argument("--pretrained_weights", default="", type=str,
                   help="checkpoint to evaluate; empty = RANDOM INIT (a baseline; never anyone else's weights)")
    p.add_argument("--checkpoint_key", default="teacher", type=str, help="key of the state dict in the checkpoint")
    p.add_argument("--arch", default=None, type=str, help="backbone (default: from the checkpoint, else vit_small)")
    p.add_argument("--mode", default=None, choices=["official", "simpool"],
                   help="SimPool compat alias: official = --pooling cls, simpool = --pooling simpool")
    p.add_argument("--pooling", default=None, type=str, help="pooling (default: from the checkpoint, else simpool)")
    p.add_argument("--gamma", default=_UNSET, type=float_or_none, help="SimPool gamma: a float, 'None' (no power) or 'default'")
    p.add_argument("--patch_size", default=None, type=int, help="ViT patch size (default: from the checkpoint, else 16)")
    p.add_argument("--depth", default=None, type=int, help="ViT depth override (tiny test models)")
    p.add_argument("--embed_dim", default=None, type=int, help="ViT width override (tiny test models)")
    p.add_argument("--num_heads", default=None, type=int, help="ViT heads override (tiny test models)")
    p.add_argument("--batch_size_per_gpu", default=128, type=int)
    p.add_argument("--nb_knn", default=list(DEFAULT_KS), nargs="+", type=int, help="k values (one search serves all)")
    p.add_argument("--temperature", default=0.07, type=float, help="vote weight exp(sim / T)")
    p.add_argument("--use_cuda", default=True, type=bool_flag, nargs="?", const=True,
                   help="use the GPU (model and search) when one is present; false keeps everything on the CPU")
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--dump_features", default=None, type=str, help="save features, labels and class names to this folder")
    p.add_argument("--dump_format", default="safetensors", choices=["safetensors", "npy"])
    p.add_argument("--load_features", default=None, type=str, help="load dumped features from this folder (no extraction)")
    p.add_argument("--data_path", default=None, type=str,
                   help="ImageFolder root with train/ and val/; not given = the embedded synthetic dataset")
    p.add_argument("--resize", default=256, type=int, help="eval transform: resize (bicubic)")
    p.add_argument("--crop", default=224, type=int, help="eval transform: center crop")
    p.add_argument("--synthetic_size", default=64, type=int, help="image size of the embedded synthetic dataset")
    p.add_argument("--output_dir", default=".", type=str, help="where knn_results.json is written")
    p.add_argument("--dist_url", default="env://", type=str)
    p.add_argument("--local_rank", "--local-rank", default=0, type=int, help="ignored (torch.distributed.launch compat)")
    p.add_argument("--backend", default="faiss", choices=["faiss", "torch", "nccl", "gloo"],
                   help="faiss|torch: the search backend; nccl|gloo: the process-group backend (SimPool eval_knn "
                        "compat; the search then stays faiss)")
    p.add_argument("--search_backend", default=None, choices=list(BACKENDS), help="explicit search backend")
    p.add_argument("--dist_backend", default=None, choices=["nccl", "gloo"], help="process-group backend")
    p.add_argument("--fp16_bank", action="store_true", help="faiss GPU: store the bank in fp16")
    p.add_argument("--n_last_blocks", default=4, type=int, help="ignored (SimPool eval_knn compat)")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate flags and untangle ``--backend`` (search vs process group). Raises ValueError."""
    args.nb_knn = _check_ks(args.nb_knn)
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0; got {args.temperature}")
    if args.batch_size_per_gpu <= 0:
        raise ValueError(f"--batch_size_per_gpu must be > 0; got {args.batch_size_per_gpu}")
    if args.resize <= 0 or args.crop <= 0 or args.crop > args.resize:
        raise ValueError(f"need 0 < --crop <= --resize; got --resize {args.resize} --crop {args.crop}")
    search, pg = "faiss", args.dist_backend
    if args.backend in BACKENDS:
        search = args.backend
    elif pg is None:
        pg = args.backend
    if args.search_backend:
        search = args.search_backend
    args.search_backend, args.dist_backend = search, pg
    if args.mode is not None:
        mode_pool = {"official": "cls", "simpool": "simpool"}[args.mode]
        if args.pooling is not None and args.pooling != mode_pool:
            raise ValueError(f"--mode {args.mode} means --pooling {mode_pool}, but --pooling {args.pooling} was given")
        args.pooling = mode_pool
    if args.load_features and args.dump_features:
        raise ValueError("--load_features and --dump_features together make no sense; pass one of them")
    return args


def check_imagefolder(root: str | os.PathLike) -> None:
    """Fail early (ValueError) when ``root`` lacks non-empty ``train/`` and ``val/`` class folders."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--data_path {root} does not exist")
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise ValueError(f"--data_path {root} has no '{split}/' folder; expected ImageFolder layout "
                             f"{root}/{{train,val}}/<class>/<image>")
        classes = list_subfolders(d)  # OSError-safe, links to folders included, hidden names skipped
        if classes is None:
            raise ValueError(f"cannot read {d}; fix its permissions")
        if not classes:
            raise ValueError(f"{d} is empty: it needs one sub-folder per class with images in it")
        if not any(list_subfolders(d / c) or _has_files(d / c) for c in classes):
            raise ValueError(f"{d} has class folders but no images in any of them")
    train_cls = set(list_subfolders(root / "train"))
    extra = sorted(c for c in list_subfolders(root / "val") if c not in train_cls)
    if extra:
        raise ValueError(f"val class(es) {extra[:5]} are not train classes; k-NN can only predict train classes "
                         f"(fix the val folder or add the class to train)")


def _has_files(folder: Path) -> bool:
    try:
        return any(f.is_file() for f in folder.iterdir())
    except OSError:
        return False


def remap_val_labels(train_classes: Sequence[str], val_classes: Sequence[str], val_labels: torch.Tensor) -> torch.Tensor:
    """Map val label ids (indices into ``val_classes``) onto train's class ids by class name.

    ImageFolder numbers classes per split; if val lacks a class the ids would shift. A val class that is not a
    train class raises ValueError.
    """
    pos = {c: i for i, c in enumerate(train_classes)}
    missing = [c for c in val_classes if c not in pos]
    if missing:
        raise ValueError(f"val class(es) {missing[:5]} are not train classes; k-NN can only predict train classes "
                         f"(fix the val folder or add the class to train)")
    table = torch.tensor([pos[c] for c in val_classes], dtype=torch.long)
    return table[torch.as_tensor(val_labels, dtype=torch.long)]


def _build_model(args, device):
    from dino_simpool.models import build_backbone, build_backbone_from_checkpoint  # lazy: another module

    overrides = {k: getattr(args, k) for k in ("arch", "pooling", "patch_size", "depth", "embed_dim", "num_heads") if getattr(args, k) is not None}
    if args.gamma is not _UNSET:
        overrides["gamma"] = args.gamma
    if args.pretrained_weights:
        model, report = build_backbone_from_checkpoint(args.pretrained_weights, checkpoint_key=args.checkpoint_key,
                                                       **overrides)
        _log(f"loaded {args.pretrained_weights} (key '{args.checkpoint_key}'): {report}")
    else:
        overrides.setdefault("arch", "vit_small")
        model = build_backbone(**overrides)
        bar = "!" * 100
        _log(f"{bar}\nWARNING: --pretrained_weights is empty: evaluating a RANDOMLY INITIALISED {overrides['arch']}.\n"
             f"These numbers are a random-init baseline, not a trained model. (No reference weights are downloaded.)\n{bar}")
    return model.to(device).eval()


def _log(msg: str) -> None:
    from dino_simpool.distributed import is_main_process
    if is_main_process():
        print(msg, flush=True)


def format_table(results: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines += [f"{'k':>6}  {'top-1':>7}  {'top-5':>7}", f"{'-' * 6}  {'-' * 7}  {'-' * 7}"]
    for k, (t1, t5) in results.items():
        lines.append(f"{k:>6}  {t1:7.2f}  {t5:7.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    from dino_simpool import distributed as D
    from eval.features import extract_features, load_features, save_features

    env = D.init_distributed(args.dist_backend, args.dist_url)
    use_cuda = bool(args.use_cuda) and torch.cuda.is_available()
    device = D.device_for(env) if use_cuda else torch.device("cpu")
    t0 = time.time()
    if args.load_features:
        bundle = load_features(args.load_features)
        _log(f"loaded features from {args.load_features}: train {tuple(bundle['train_feats'].shape)}, "
             f"test {tuple(bundle['test_feats'].shape)}")
        classes = bundle.get("classes")
    else:
        if args.data_path:
            check_imagefolder(args.data_path)
        from dino_simpool.data import build_dataset  # lazy: another module
        from dino_simpool.dino.augment import eval_transform

        model = _build_model(args, device)  # first: a checkpoint/arch mismatch fails before any data work
        tf = eval_transform(args.resize, args.crop)
        ds_train = build_dataset(args.data_path, "train", transform=tf, image_size=args.synthetic_size)
        ds_val = build_dataset(args.data_path, "val", transform=tf, image_size=args.synthetic_size)
        if len(ds_train) == 0 or len(ds_val) == 0:
            raise ValueError(f"empty dataset: train has {len(ds_train)} images, val {len(ds_val)}")
        _log(f"data: {args.data_path or 'embedded synthetic dataset'}: train {len(ds_train)} images, val {len(ds_val)} "
             f"images, {len(ds_train.classes)} classes")
        train_feats, train_labels = extract_features(model, ds_train, args.batch_size_per_gpu, args.num_workers,
                                                     device, desc="train features")
        test_feats, test_labels = extract_features(model, ds_val, args.batch_size_per_gpu, args.num_workers,
                                                   device, desc="val features")
        test_labels = remap_val_labels(ds_train.classes, ds_val.classes, test_labels)
        classes = list(ds_train.classes)
        bundle = {"train_feats": l2_normalize(train_feats), "train_labels": train_labels,
                  "test_feats": l2_normalize(test_feats), "test_labels": test_labels}
        if args.dump_features and D.is_main_process():
            path = save_features(args.dump_features, bundle["train_feats"], train_labels, bundle["test_feats"],
                                 test_labels, classes, fmt=args.dump_format)
            _log(f"features dumped to {path}")
    t_feat = time.time() - t0

    results = None
    if D.is_main_process():  # every rank holds the features; the search runs once, on rank 0
        t1 = time.time()
        results = knn_classify(bundle["train_feats"], bundle["train_labels"], bundle["test_feats"],
                               bundle["test_labels"], ks=args.nb_knn, T=args.temperature, backend=args.search_backend,
                               num_classes=len(classes) if classes else None,
                               use_gpu=None if use_cuda else False, fp16_bank=args.fp16_bank, device=device)
        t_search = time.time() - t1
        print(format_table(results, f"weighted k-NN (T={args.temperature}, {args.search_backend} search)"), flush=True)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "results": {str(k): {"top1": t1_, "top5": t5_} for k, (t1_, t5_) in results.items()},
            "n_train": int(bundle["train_feats"].shape[0]), "n_test": int(bundle["test_feats"].shape[0]),
            "num_classes": len(classes) if classes else int(bundle["train_labels"].max()) + 1,
            "temperature": args.temperature, "search_backend": args.search_backend,
            "pretrained_weights": args.pretrained_weights or None, "checkpoint_key": args.checkpoint_key,
            "data_path": args.data_path, "load_features": args.load_features,
            "seconds": {"features": round(t_feat, 3), "search": round(t_search, 3)},
        }
        (out / "knn_results.json").write_text(json.dumps(payload, indent=2) + "\n")
        print(f"results written to {out / 'knn_results.json'}", flush=True)
    D.barrier()
    D.cleanup()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dino_simpool.checkpoint import CheckpointError

    errors: tuple[type[BaseException], ...] = (ValueError, CheckpointError, FileNotFoundError)
    try:
        from dino_simpool.data import DataError  # noqa: F401  (a ValueError subclass; listed for clarity)
    except ImportError:
        pass
    try:
        resolve_args(args)
        run(args)
    except errors as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"dino-simpool-knn: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
