"""Weighted k-NN classification on frozen features (DINO's protocol), with one faiss search for every k.

:func:`knn_accuracy` embeds a bank and a val set with a backbone and scores it: training's periodic k-NN and the demo
call it. :func:`knn_classify` scores features already extracted. The command line is ``eval/knn.py``
(``dino-simpool-knn``).

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

import math
import warnings
from typing import Iterable, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dino_simpool import distributed as D
from dino_simpool.evaluation.features import extract_features

DEFAULT_KS = (10, 20, 100, 200)
GPU_MAX_K = 2048  # faiss GPU k-selection limit
BACKENDS = ("faiss", "torch")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation in fp32 (DINO: ``nn.functional.normalize(x, dim=1, p=2)``)."""
    return F.normalize(x.float(), dim=1, p=2)


def check_ks(ks: Iterable[int]) -> list[int]:
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


def _searcher(train_feats: torch.Tensor, backend: str, kmax: int, use_gpu: bool | None, fp16_bank: bool,
              add_chunk: int, device: torch.device | str | None, query_chunk: int | None):
    """The search backend over the bank, and the number of queries it takes per call (see :func:`knn_classify`)."""
    if backend == "faiss":
        gpu_ok = faiss_gpu_available()
        if use_gpu and not gpu_ok:
            raise ValueError("use_gpu=True but faiss has no GPU support here (or no CUDA GPU is visible); install a GPU "
                             "faiss build (pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12) or use the CPU index")
        gpu = gpu_ok if use_gpu is None else bool(use_gpu)
        if gpu and kmax > GPU_MAX_K:
            warnings.warn(f"max k={kmax} exceeds faiss GPU's limit of {GPU_MAX_K}; searching on the CPU index", stacklevel=3)
            gpu = False
        return _FaissSearcher(train_feats, use_gpu=gpu, fp16_bank=fp16_bank, add_chunk=add_chunk), query_chunk or 8192
    dev = torch.device(device) if device is not None else train_feats.device
    return _TorchSearcher(train_feats, dev), query_chunk or max(1, (1 << 26) // train_feats.shape[0])


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
    ks = check_ks(ks)
    train_labels, test_labels, n_cls = _check_inputs(train_feats, train_labels, test_feats, test_labels, T, num_classes)
    n_bank, n_test = train_feats.shape[0], test_feats.shape[0]

    for k in ks:
        if k > n_bank:
            warnings.warn(f"k={k} is larger than the train bank ({n_bank} features); using all {n_bank} as neighbours "
                          f"(reported under k={k})", stacklevel=2)
    kmax = min(max(ks), n_bank)

    searcher, chunk = _searcher(train_feats, backend, kmax, use_gpu, fp16_bank, add_chunk, device, query_chunk)
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


def knn_accuracy(
    backbone: torch.nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    ks: Sequence[int] = DEFAULT_KS,
    T: float = 0.07,
    batch_size: int = 128,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    backend: str = "faiss",
) -> dict[int, tuple[float, float]]:
    """Weighted k-NN top-1/top-5 (percent) of ``backbone`` on ``val_dataset``, ``train_dataset`` as the bank.

    Every rank embeds its shard of both sets (:func:`extract_features`); rank 0 alone searches and returns
    ``{k: (top1, top5)}``, the other ranks return ``{}``; all ranks leave together (a barrier). The class count is
    the bank's ``classes`` when it has them (ImageFolder, the embedded dataset), else the largest train label + 1.
    """
    bank, bank_labels = extract_features(backbone, train_dataset, batch_size, num_workers, device, desc="k-NN train")
    val, val_labels = extract_features(backbone, val_dataset, batch_size, num_workers, device, desc="k-NN val")
    results: dict[int, tuple[float, float]] = {}
    if D.is_main_process():
        num_classes = len(getattr(train_dataset, "classes", None) or []) or None
        results = knn_classify(bank, bank_labels, val, val_labels, ks=ks, T=T, backend=backend,
                               num_classes=num_classes)
    D.barrier()
    return results
