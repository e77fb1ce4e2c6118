"""Weighted k-NN classification on frozen features (DINO's protocol): one exact search for every k, split over the
ranks, on the training device when faiss has no GPU.

:func:`knn_accuracy` embeds a bank and a val set with a backbone and scores it: training's periodic k-NN and the demo
call it. :func:`knn_classify` scores features already extracted; :func:`knn_classify_shard` scores a bank that is
split over the ranks. The command line is ``eval/knn.py`` (``dino-simpool-knn``).

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

How the search is split (why it is exact on any number of ranks):

* The bank is cut into blocks of :data:`BANK_BLOCK` consecutive rows (dataset order); each rank holds a contiguous
  run of whole blocks (:func:`shard_rows`) and embeds only those images, so no rank ever holds the whole bank.
* Every rank scores ALL queries (the val set, gathered to every rank) against its own blocks, one block at a time,
  and keeps the ``max(k)`` best per query. The blocks, and the query chunks within them, are the same whatever the
  number of ranks, so every similarity is computed by the same call on the same rows: bit-identical to one rank.
* Candidates are ranked by one int64 key: (similarity, then lower bank row first). The per-rank lists are merged
  (``dist.gather`` of one query chunk at a time onto the rank that votes it, round robin) by the same key, so the
  neighbour lists, and with them the vote, equal the single-rank ones exactly, ties included.
* Each query chunk is voted on by one rank; the correct counts are all-reduced: every rank returns the same result.

Ties (documented, not hidden):

* two classes with exactly the same summed weight: the lower class id ranks first (a stable sort; DINO's sort
  leaves this unspecified);
* two train images with exactly the same similarity: the lower bank row ranks first (the key). Inside one block
  the faiss backend picks among bit-identical similarities itself, so faiss and torch may keep different ones of
  such twins; any number of ranks gives the single-rank answer of the same backend.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import faiss
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset

from dino_simpool import distributed as D
from dino_simpool.evaluation.features import (GATHER_CHUNK, UNREADABLE, embed_rows, extract_features,
                                              gather_rows_per_rank, model_device)

DEFAULT_KS = (10, 20, 100, 200)
GPU_MAX_K = 2048  # faiss GPU k-selection limit
BACKENDS = ("auto", "faiss", "torch")
BANK_BLOCK = 8192  # bank rows per search block: the unit of the split over ranks (imbalance <= one block)
FAISS_QUERY_CHUNK = 8192  # queries per faiss call
TORCH_BLOCK_BYTES = 1 << 28  # torch backend: the (query chunk x block) similarities and keys, ~24 bytes per cell
QUERY_DEVICE_BYTES = 1 << 30  # torch backend: the normalised queries stay on the device when they take no more
MERGE_BYTES = 1 << 26  # candidate keys that one merge step gathers onto its voting rank
VOTE_CELLS = 1 << 20  # (queries x classes) float64 scores of one vote sub-chunk (8 MiB)
KEY_PAD = torch.iinfo(torch.int64).min  # "no candidate": below every real key
_LOW = (1 << 32) - 1
Log = Callable[[str], None]


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


def _check_inputs(n_train: int, d_train: int, train_labels, test_feats, test_labels, T, num_classes):
    """The checks every rank can make on its own (all ranks see the same labels and queries): raise the same error
    on every rank. Returns ``(test_labels, number of classes)``."""
    if not (isinstance(T, (int, float)) and T > 0 and math.isfinite(T)):
        raise ValueError(f"the temperature T must be a positive number; got {T!r}")
    if test_feats.ndim != 2:
        raise ValueError(f"features must be 2-D (N, d); got test {tuple(test_feats.shape)}")
    if d_train != test_feats.shape[1]:
        raise ValueError(f"train features have dim {d_train} but test features have dim {test_feats.shape[1]}; "
                         f"they must come from the same model")
    if n_train == 0:
        raise ValueError("the train bank is empty: k-NN needs at least one train feature")
    if n_train >= 1 << 32:
        raise ValueError(f"a bank of {n_train} rows is beyond this k-NN's 2**32-row limit")
    if test_feats.shape[0] == 0:
        raise ValueError("there are no test features to classify")
    if not _all_finite(test_feats):
        raise ValueError("the test features contain NaN or inf (a diverged model?); k-NN needs finite features")
    train_labels = torch.as_tensor(train_labels).reshape(-1).long().cpu()
    test_labels = torch.as_tensor(test_labels).reshape(-1).long().cpu()
    if len(train_labels) != n_train:
        raise ValueError(f"{n_train} train features but {len(train_labels)} train labels")
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
    return test_labels, n_cls


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support, sees a GPU, and torch sees CUDA."""
    return (hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available()
            and faiss.get_num_gpus() > 0)


def is_unit_norm(x: torch.Tensor, tol: float = 1e-5, chunk: int = 16384) -> bool:
    """True when ``x`` is fp32 and every row already has unit L2 norm (checked in chunks, no full-size temporary)."""
    if x.dtype != torch.float32:
        return False
    for s in range(0, x.shape[0], chunk):
        norms = torch.linalg.vector_norm(x[s:s + chunk], dim=1)
        if not bool(((norms - 1).abs() <= tol).all()):
            return False
    return True


def _all_finite(x: torch.Tensor, chunk: int = 16384) -> bool:
    return all(bool(torch.isfinite(x[s:s + chunk]).all()) for s in range(0, x.shape[0], chunk))


# ----------------------------------------------------------------------------------------------------------------
# the split over ranks, and the sizes every buffer takes (one place: the code and benchmarks/knn_memory.py use them)
# ----------------------------------------------------------------------------------------------------------------
def shard_rows(n: int, world: int, rank: int, bank_block: int = BANK_BLOCK) -> range:
    """The bank rows rank ``rank`` of ``world`` holds: a contiguous run of whole ``bank_block``-row blocks (the
    ranks differ by at most one block; with fewer blocks than ranks some ranks hold none)."""
    if bank_block < 1:
        raise ValueError(f"bank_block must be >= 1; got {bank_block}")
    nb = -(-n // bank_block)
    b0, b1 = rank * nb // world, (rank + 1) * nb // world
    return range(min(n, b0 * bank_block), min(n, b1 * bank_block))


def torch_query_chunk(bank_block: int = BANK_BLOCK) -> int:
    """Queries per matmul of the torch backend: (chunk x block) cells of ~24 bytes (fp32 similarity, int64 key and
    its temporary) fit in :data:`TORCH_BLOCK_BYTES`. Depends on the block size only, never on the rank count."""
    return max(1, TORCH_BLOCK_BYTES // (24 * bank_block))


def merge_chunk(world: int, kmax: int) -> int:
    """Queries per merge step: the voting rank receives ``world x chunk x kmax`` int64 keys, at most
    :data:`MERGE_BYTES`."""
    return max(1, MERGE_BYTES // (8 * max(1, world) * max(1, kmax)))


def search_flops(n_query: int, n_bank: int, dim: int) -> int:
    """Multiply-adds x 2 of the exhaustive search: every query against every bank row."""
    return 2 * int(n_query) * int(n_bank) * int(dim)


def periodic_knn_memory(n_bank: int, n_query: int, dim: int, world: int, kmax: int = 200, backend: str = "torch",
                        nccl: bool = True, bank_block: int = BANK_BLOCK, gather_chunk: int = GATHER_CHUNK
                        ) -> dict[str, int]:
    """Peak bytes per rank of :func:`knn_accuracy` (training's periodic k-NN), computed from the code's own chunk
    sizes (no GPU needed): ``{"host": ..., "device": ...}`` for the rank with the most bank rows, plus each phase's
    ``<phase>_host`` / ``<phase>_device``.

    ``backend``: ``"torch"`` (the search on the training GPU: faiss without GPU support) or ``"faiss"`` (faiss-cpu
    on a CPU node; raw features normalised one block at a time). ``nccl``: the collectives' buffers live on the GPU
    (else, gloo, on the host). Phases: ``val`` (the val set embedded in shards and gathered to every rank), ``bank``
    (this rank's rows embedded, never gathered), ``search`` (all queries against this rank's blocks) and ``merge``
    (the voting rank's gathered candidates). Model activations and the training's own memory are not counted.
    """
    f32, i64 = 4, 8
    rows = max(len(shard_rows(n_bank, world, r, bank_block)) for r in range(world))
    c = gather_rows_per_rank(world, gather_chunk)
    local_q = -(-n_query // world)
    val, shard = n_query * dim * f32, rows * dim * f32
    block = min(bank_block, max(rows, 1))
    best = n_query * kmax * i64
    # val: this rank's rows, the gathered set; per step the comm buffers (this rank's c rows, world x c received),
    # their host copy and the rows kept from it (_gather_in_dataset_order)
    comm = (world + 1) * c * dim * f32 if world > 1 else 0
    out = {"val_host": local_q * dim * f32 + val + (2 * world * c * dim * f32 if world > 1 else 0)
           + (0 if nccl else comm), "val_device": comm if nccl else 0,
           "bank_host": val + shard, "bank_device": 0}
    # from the search on: the val set, its normalised copy, this rank's rows and the whole bank's labels
    base = 2 * val + shard + n_bank * i64
    mc = min(n_query, merge_chunk(world, kmax))
    merge = 2 * world * mc * kmax * i64 if world > 1 else 0  # the gathered keys and their concatenation
    vote_host = mc * kmax * (i64 + f32 + i64) + VOTE_CELLS * i64 * 3  # a chunk's keys, sims, labels; vote scores
    if backend == "torch":
        qc = min(n_query, torch_query_chunk(bank_block))
        q_dev = val if val <= QUERY_DEVICE_BYTES else qc * dim * f32
        # the block and its normalised copy; a chunk's similarities (4 B), keys and their temporary (2 x 8 B);
        # the running best keys, a chunk's block top-k, their concatenation and its top-k
        out["search_device"] = q_dev + 2 * block * dim * f32 + 20 * qc * block + best + qc * kmax * i64 * 4
        out["search_host"] = base
        out["merge_device"] = best + (merge if nccl else 0)
        out["merge_host"] = base + (0 if nccl else merge) + vote_host
    else:
        qc = min(n_query, FAISS_QUERY_CHUNK)
        # a normalised block; faiss' sims and ids of a query chunk, their keys (with a temporary), the
        # concatenation with the running best and its top-k
        out["search_device"] = 0
        out["search_host"] = base + block * dim * f32 + best + qc * kmax * (f32 + i64 + 2 * i64 + 2 * i64 + i64)
        out["merge_device"] = merge if nccl else 0
        out["merge_host"] = base + best + (0 if nccl else merge) + vote_host
    out["host"] = max(out[f"{p}_host"] for p in ("val", "bank", "search", "merge"))
    out["device"] = max(out[f"{p}_device"] for p in ("val", "bank", "search", "merge"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# keys: (similarity, lower row first) as one int64, so that every selection is exact and tie-free
# ----------------------------------------------------------------------------------------------------------------
def _keys(sims: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (similarity, then the lower global bank row): IEEE fp32 bits made order-preserving in
    the high 32 bits, ``2**32 - 1 - row`` in the low 32."""
    k = sims.contiguous().view(torch.int32).to(torch.int64)
    k = torch.where(k < 0, k ^ 0x7FFFFFFF, k)
    return k.mul_(1 << 32).add_(_LOW - rows)


def _unkeys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities fp32, global bank rows int64) of real keys (not ``KEY_PAD``)."""
    hi = torch.div(keys, 1 << 32, rounding_mode="floor")
    rows = _LOW - (keys - hi * (1 << 32))
    hi = torch.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    return hi.to(torch.int32).view(torch.float32), rows


def _merge_into(best: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The ``best.shape[1]`` largest keys of both (sorted, largest first)."""
    return torch.topk(torch.cat([best, new], dim=1), best.shape[1], dim=1, sorted=True).values


# ----------------------------------------------------------------------------------------------------------------
# search backends: score every query against one bank block at a time and fold the block's best into ``best``
# ----------------------------------------------------------------------------------------------------------------
class _TorchBlocks:
    """Chunked matmul + ``topk`` on ``device`` (the training GPU when faiss has none): the block and a query chunk
    on the device, the similarity block ``chunk x block`` sized by :func:`torch_query_chunk`."""

    def __init__(self, queries: torch.Tensor, device: torch.device, unit: bool, query_chunk: int):
        self.device, self.unit, self.qc = device, unit, query_chunk
        self.q = queries
        self.q_dev = queries.to(device) if queries.numel() * 4 <= QUERY_DEVICE_BYTES else None
        self.result_device = device

    def name(self) -> str:
        return f"torch matmul + topk on {self.device}"

    def search_block(self, bank: torch.Tensor, rows: torch.Tensor, best: torch.Tensor) -> None:
        b = bank.to(self.device, torch.float32)
        b = b if self.unit else l2_normalize(b)
        r = rows.to(self.device)
        kb = min(best.shape[1], b.shape[0])
        for s in range(0, self.q.shape[0], self.qc):
            q = self.q_dev[s:s + self.qc] if self.q_dev is not None else self.q[s:s + self.qc].to(self.device)
            top = torch.topk(_keys(q @ b.T, r), kb, dim=1, sorted=True).values
            best[s:s + self.qc] = _merge_into(best[s:s + self.qc], top)

    def close(self) -> None:
        self.q_dev = None


class _FaissBlocks:
    """Exact inner-product faiss search of one block at a time: ``faiss.knn`` on the block's memory (CPU; an
    already unit-norm fp32 bank is not copied, a raw one is normalised one block at a time), or a
    ``GpuIndexFlatIP`` that holds one block (optionally fp16), refilled for each block."""

    def __init__(self, queries: torch.Tensor, unit: bool, query_chunk: int, use_gpu: bool, fp16_bank: bool,
                 bank_block: int, gpu_device: int | None = None):
        self.q = queries.cpu().contiguous().numpy()
        self.unit, self.qc, self.index, self.res = unit, query_chunk, None, None
        self.result_device = torch.device("cpu")
        d = self.q.shape[1]
        if use_gpu:
            dev = torch.cuda.current_device() if gpu_device is None else int(gpu_device)
            if torch.cuda.is_available():  # faiss allocates outside torch's cache: hand the training's cached blocks back
                torch.cuda.empty_cache()
            self.res = faiss.StandardGpuResources()  # keep a reference: the index uses it until it is freed
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device = dev
            cfg.useFloat16 = bool(fp16_bank)
            self.index = faiss.GpuIndexFlatIP(self.res, d, cfg)
            if hasattr(self.index, "reserveMemory"):
                self.index.reserveMemory(bank_block)
            self._name = f"faiss GpuIndexFlatIP (device {dev}{', fp16 bank' if fp16_bank else ''}), one block at a time"
        else:
            if fp16_bank:
                warnings.warn("fp16_bank applies to the GPU faiss index only; the CPU search uses fp32", stacklevel=4)
            self._name = (f"faiss.knn on the CPU ({faiss.omp_get_max_threads()} OpenMP threads), "
                          + ("on the caller's unit-norm bank, zero-copy" if unit else "normalised block by block"))

    def name(self) -> str:
        return self._name

    def search_block(self, bank: torch.Tensor, rows: torch.Tensor, best: torch.Tensor) -> None:
        if self.unit and bank.device.type == "cpu" and bank.dtype == torch.float32 and bank.is_contiguous():
            b = bank.detach().numpy()  # a view: no copy
        else:
            b = l2_normalize(bank).cpu().contiguous().numpy()
        kb = min(best.shape[1], b.shape[0])
        rows = rows.cpu()
        if self.index is not None:
            self.index.reset()
            self.index.add(b)
        for s in range(0, self.q.shape[0], self.qc):
            q = self.q[s:s + self.qc]
            if self.index is not None:
                sims, idx = self.index.search(q, kb)
            else:
                sims, idx = faiss.knn(q, b, kb, metric=faiss.METRIC_INNER_PRODUCT)
            idx = torch.from_numpy(idx)
            if bool((idx < 0).any()):  # faiss pads with -1 when it finds fewer than k results
                raise RuntimeError("the faiss index returned fewer neighbours than asked; this is a bug, please report it")
            best[s:s + self.qc] = _merge_into(best[s:s + self.qc], _keys(torch.from_numpy(sims), rows[idx]))

    def close(self) -> None:
        if self.index is not None:
            self.index.reset()
        self.index = self.res = None


def resolve_backend(backend: str, device: torch.device, use_gpu: bool | None, kmax: int) -> tuple[str, bool]:
    """``(backend, faiss on the GPU)`` for ``backend`` in :data:`BACKENDS` searching for ``device``.

    ``auto``: faiss on the GPU when faiss has GPU support (and k <= 2048), else the torch backend on a CUDA
    ``device`` (the training GPU), else faiss on the CPU. ``faiss``: the GPU index when available (``use_gpu=None``),
    required (``True``) or never (``False``). ``torch``: matmul + topk on ``device``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    gpu_ok = faiss_gpu_available()
    if backend == "faiss" and use_gpu and not gpu_ok:
        raise ValueError("use_gpu=True but faiss has no GPU support here (or no CUDA GPU is visible); install a GPU "
                         "faiss build (pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12) or use the CPU index")
    if backend == "torch":
        return "torch", False
    if backend == "auto":
        if device.type == "cuda" and use_gpu is not False and not (gpu_ok and kmax <= GPU_MAX_K):
            return "torch", False
        if device.type != "cuda" or use_gpu is False:
            return "faiss", False
    gpu = gpu_ok if use_gpu is None else bool(use_gpu)
    if gpu and kmax > GPU_MAX_K:
        warnings.warn(f"max k={kmax} exceeds faiss GPU's limit of {GPU_MAX_K}; searching on the CPU index", stacklevel=3)
        gpu = False
    return "faiss", gpu


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


# ----------------------------------------------------------------------------------------------------------------
# a bank split over the ranks
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class BankShard:
    """This rank's part of the bank: ``feats`` (m, d) of the global bank rows ``rows`` (sorted, inside
    :func:`shard_rows` of this rank), and ``labels`` (n,) of the WHOLE bank (``UNREADABLE`` = a row left out)."""
    feats: torch.Tensor
    rows: torch.Tensor
    labels: torch.Tensor
    bank_block: int = BANK_BLOCK


def _gather_labels(labels: torch.Tensor, rows: torch.Tensor, n: int, bank_block: int) -> torch.Tensor:
    """Every rank's ``(row, label)`` assembled into the (n,) labels of the whole bank, on every rank (n int64: the
    one bank-sized thing every rank keeps)."""
    world, rank = D.get_world_size(), D.get_rank()
    if world == 1:
        out = torch.full((n,), UNREADABLE, dtype=torch.long)
        out[rows] = labels
        return out
    spans = [shard_rows(n, world, r, bank_block) for r in range(world)]
    width = max(len(s) for s in spans)
    mine = torch.full((width,), UNREADABLE, dtype=torch.long)
    mine[rows - spans[rank].start] = labels
    comm = _comm_device()
    parts = [torch.empty(width, dtype=torch.long, device=comm) for _ in range(world)]
    dist.all_gather(parts, mine.to(comm))
    return torch.cat([p[:len(s)].cpu() for p, s in zip(parts, spans)])


def extract_bank_shard(model: torch.nn.Module, dataset: Dataset, batch_size: int = 128, num_workers: int = 2,
                       device: torch.device | str | None = None, bank_block: int = BANK_BLOCK, desc: str = ""
                       ) -> BankShard:
    """Embed this rank's rows of the bank (:func:`shard_rows`) and learn every rank's labels. Collective: every rank
    calls it. Unreadable images are left out (one warning with the count, on rank 0)."""
    n = len(dataset)
    if n == 0:
        raise ValueError(f"cannot extract features from an empty dataset ({desc or 'dataset'})")
    world, rank = D.get_world_size(), D.get_rank()
    feats, labels, rows = embed_rows(model, dataset, shard_rows(n, world, rank, bank_block), batch_size,
                                     num_workers, device, desc)
    all_labels = _gather_labels(labels, rows, n, bank_block)
    dropped = int((all_labels == UNREADABLE).sum())
    if dropped and rank == 0:
        warnings.warn(f"{desc or 'features'}: {dropped} unreadable image(s) left out ({n - dropped} of {n} kept)",
                      stacklevel=2)
    return BankShard(feats, rows, all_labels, bank_block)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _any_rank(flags: list[bool], group: bool) -> list[bool]:
    if not group:
        return flags
    t = torch.tensor([float(f) for f in flags], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.cpu().tolist()]


def _block_spans(rows: torch.Tensor, bank_block: int) -> list[tuple[int, int]]:
    """Positions ``[s, e)`` in ``rows`` (sorted global rows) of each bank block present."""
    if rows.numel() == 0:
        return []
    blocks = torch.div(rows, bank_block, rounding_mode="floor")
    ids, counts = torch.unique_consecutive(blocks, return_counts=True)
    ends = torch.cumsum(counts, 0).tolist()
    return list(zip([0] + ends[:-1], ends))


def knn_classify_shard(
    shard: BankShard,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    T: float = 0.07,
    backend: str = "auto",
    num_classes: int | None = None,
    *,
    use_gpu: bool | None = None,
    fp16_bank: bool = False,
    query_chunk: int | None = None,
    device: torch.device | str | None = None,
    return_predictions: bool = False,
    log: Log | None = None,
    group: bool | None = None,
):
    """Weighted k-NN accuracy over a bank split across the ranks (module docstring): every rank passes its
    :class:`BankShard` and the SAME queries; every rank returns the same ``{k: (top1, top5)}``, equal to one rank's.

    ``group``: split over the process group (default: when one is initialised); ``False`` = this process alone,
    with ``shard`` the whole bank. ``log`` (rank 0's lines): the search's FLOPs before it starts and an ETA after
    its first block. Other arguments as in :func:`knn_classify`.
    """
    group = D.is_dist() if group is None else bool(group) and D.is_dist()
    world, rank = (D.get_world_size(), D.get_rank()) if group else (1, 0)
    say = log if (log is not None and rank == 0) else None
    ks = check_ks(ks)
    all_labels = torch.as_tensor(shard.labels).reshape(-1).long().cpu()
    present = all_labels != UNREADABLE
    n_bank = int(present.sum())
    d = test_feats.shape[1] if test_feats.ndim == 2 else -1
    test_labels, n_cls = _check_inputs(n_bank, d, all_labels[present], test_feats, test_labels, T, num_classes)
    feats, rows = shard.feats, torch.as_tensor(shard.rows).reshape(-1).long().cpu()
    span = shard_rows(len(all_labels), world, rank, shard.bank_block)
    bad = (feats.ndim != 2 or len(feats) != len(rows) or (len(feats) > 0 and feats.shape[1] != d)
           or (len(rows) > 0 and (int(rows[0]) < span.start or int(rows[-1]) >= span.stop
                                  or bool((rows[1:] <= rows[:-1]).any()) or bool((all_labels[rows] == UNREADABLE).any()))))
    nonfinite = not bad and not _all_finite(feats)
    not_unit = not bad and len(feats) > 0 and not is_unit_norm(feats)
    bad, nonfinite, not_unit = _any_rank([bad, nonfinite, not_unit], group)
    if bad:
        raise ValueError("a rank's bank shard does not match shard_rows() of the bank (or the labels, or the test "
                         "features' dim): build it with extract_bank_shard")
    if nonfinite:
        raise ValueError("the train features contain NaN or inf (a diverged model?); k-NN needs finite features")
    for k in ks:
        if k > n_bank and rank == 0:
            warnings.warn(f"k={k} is larger than the train bank ({n_bank} features); using all {n_bank} as neighbours "
                          f"(reported under k={k})", stacklevel=2)
    kmax = min(max(ks), n_bank)
    dev = torch.device(device) if device is not None else (feats.device if feats.numel() else torch.device("cpu"))
    name, gpu = resolve_backend(backend, dev, use_gpu, kmax)
    queries = l2_normalize(test_feats).cpu().contiguous()
    block = shard.bank_block
    if name == "torch":
        searcher = _TorchBlocks(queries, dev, not not_unit, query_chunk or torch_query_chunk(block))
    else:
        searcher = _FaissBlocks(queries, not not_unit, query_chunk or FAISS_QUERY_CHUNK, gpu, fp16_bank, block,
                                dev.index if dev.type == "cuda" else None)
    spans = _block_spans(rows, block)
    n_q = queries.shape[0]
    if say:
        say(f"k-NN: {n_q} queries x {n_bank} bank rows x {d} dims = {search_flops(n_q, n_bank, d):.2e} FLOP over "
            f"{world} rank(s); rank 0: {search_flops(n_q, len(rows), d):.2e} FLOP in {len(spans)} block(s) of "
            f"<= {block} rows; {searcher.name()}")
    t0 = time.perf_counter()
    best = torch.full((n_q, kmax), KEY_PAD, dtype=torch.int64, device=searcher.result_device)
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the similarities (restored below)
    try:
        for i, (s, e) in enumerate(spans):
            searcher.search_block(feats[s:e], rows[s:e], best)
            if i == 0 and say and len(spans) > 1:
                if best.device.type == "cuda":
                    torch.cuda.synchronize(best.device)
                t1 = time.perf_counter() - t0
                say(f"k-NN: first block took {t1:.2f} s; ETA of rank 0's search about {t1 * len(spans):.0f} s")
    finally:
        torch.set_float32_matmul_precision(prec)
        searcher.close()
    out = _merge_and_vote(best, all_labels, test_labels, ks, T, n_cls, world, rank, group, return_predictions)
    if say:
        say(f"k-NN: search, merge and vote took {time.perf_counter() - t0:.1f} s")
    return out


def _merge_and_vote(best: torch.Tensor, bank_labels: torch.Tensor, test_labels: torch.Tensor, ks: list[int],
                    T: float, n_cls: int, world: int, rank: int, group: bool, return_predictions: bool):
    """Merge the ranks' candidate keys one query chunk at a time onto the chunk's voting rank (round robin), vote,
    and all-reduce the correct counts."""
    n_q, kmax = best.shape
    mc = merge_chunk(world, kmax)
    comm = _comm_device() if group else torch.device("cpu")
    correct = torch.zeros(2, len(ks), dtype=torch.int64)
    preds: list[tuple[int, dict[int, torch.Tensor]]] = []
    sub = max(1, VOTE_CELLS // n_cls)
    for c, s in enumerate(range(0, n_q, mc)):
        owner = c % world
        chunk = best[s:s + mc]
        if world > 1:
            src = chunk.to(comm).contiguous()
            parts = [torch.empty_like(src) for _ in range(world)] if rank == owner else None
            dist.gather(src, parts, dst=owner)
            if rank != owner:
                continue
            top = torch.topk(torch.cat(parts, dim=1), kmax, dim=1, sorted=True).values.cpu()
        else:
            top = chunk.cpu()
        sims, nbr_rows = _unkeys(top)
        nbr = bank_labels[nbr_rows]
        tgt = test_labels[s:s + mc].view(-1, 1)
        # vote in sub-chunks: the (rows, classes) score/sort buffers stay ~10 MB even for 1000 classes
        parts_v = [vote(sims[v:v + sub], nbr[v:v + sub], ks, T, n_cls) for v in range(0, top.shape[0], sub)]
        chunk_preds = {}
        for j, k in enumerate(ks):
            p = torch.cat([b[k] for b in parts_v])
            correct[0, j] += int((p[:, :1] == tgt).sum())
            correct[1, j] += int((p == tgt).any(dim=1).sum())
            chunk_preds[k] = p
        if return_predictions:
            preds.append((s, chunk_preds))
    if world > 1:
        t = correct.to(comm)
        dist.all_reduce(t)
        correct = t.cpu()
        if return_predictions:
            every: list = [None] * world
            dist.all_gather_object(every, preds)
            preds = [x for part in every for x in part]
    results = {k: (100.0 * int(correct[0, j]) / n_q, 100.0 * int(correct[1, j]) / n_q) for j, k in enumerate(ks)}
    if return_predictions:
        preds.sort(key=lambda x: x[0])
        return results, {k: torch.cat([p[k] for _, p in preds]) for k in ks}
    return results


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
    bank_block: int = BANK_BLOCK,
    device: torch.device | str | None = None,
    return_predictions: bool = False,
    distributed: bool = False,
    log: Log | None = None,
):
    """Weighted k-NN accuracy, DINO's protocol. Returns ``{k: (top1, top5)}`` in percent (Python floats).

    Args:
        train_feats, test_feats: (N, d) features, any float dtype/device; L2-normalised in fp32 inside.
        train_labels, test_labels: (N,) integer class ids. Classes are ``0 .. max(train_labels)`` (or
            ``num_classes``); a test label outside them raises ``ValueError``.
        ks: the k values; one search with ``max(k)`` serves all. A k larger than the bank is clamped with a warning.
        T: the temperature of the ``exp(sim / T)`` vote weights.
        backend: ``"faiss"`` (exact inner product; the GPU index when faiss has GPU support, a GPU is visible and
            torch sees CUDA), ``"torch"`` (chunked matmul + topk on ``device``) or ``"auto"``
            (:func:`resolve_backend`: faiss GPU, else torch on a CUDA ``device``, else faiss CPU).
        use_gpu: faiss only: ``None`` = auto (above); ``True`` requires the GPU index; ``False`` forces the CPU one.
        fp16_bank: store the bank block in fp16 on the GPU (faiss GPU only; similarities then carry fp16 rounding).
        query_chunk: queries per search call (default: 8192 for faiss; for torch :func:`torch_query_chunk`).
        bank_block: bank rows searched per step (and the unit of the split over ranks).
        A bank that is already unit-norm fp32 (row norms within 1e-5 of 1) is used as is by both backends (no copy);
        anything else is normalised one block at a time.
        device: torch backend only: where to compute (default: the train features' device).
        return_predictions: also return ``{k: (N_test, min(5, k, C)) int64}`` predicted classes.
        distributed: every rank of the process group calls this with the same features; each searches its
            :func:`shard_rows` and all return the same result (:func:`knn_classify_shard`).
        log: where the search's FLOP count and ETA go (rank 0), e.g. ``print``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError(f"features must be 2-D (N, d); got train {tuple(train_feats.shape)}, test {tuple(test_feats.shape)}")
    labels = torch.as_tensor(train_labels).reshape(-1).long().cpu()
    test_labels, _ = _check_inputs(train_feats.shape[0], train_feats.shape[1], labels, test_feats, test_labels, T,
                                   num_classes)
    group = distributed and D.is_dist()
    world, rank = (D.get_world_size(), D.get_rank()) if group else (1, 0)
    span = shard_rows(len(labels), world, rank, bank_block)
    shard = BankShard(train_feats[span.start:span.stop], torch.arange(span.start, span.stop), labels, bank_block)
    dev = device if device is not None else train_feats.device
    return knn_classify_shard(shard, test_feats, test_labels, ks, T, backend, num_classes, use_gpu=use_gpu,
                              fp16_bank=fp16_bank, query_chunk=query_chunk, device=dev,
                              return_predictions=return_predictions, log=log, group=group)


def knn_accuracy(
    backbone: torch.nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    ks: Sequence[int] = DEFAULT_KS,
    T: float = 0.07,
    batch_size: int = 128,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    backend: str = "auto",
    bank_block: int | None = None,
    log: Log | None = None,
) -> dict[int, tuple[float, float]]:
    """Weighted k-NN top-1/top-5 (percent) of ``backbone`` on ``val_dataset``, ``train_dataset`` as the bank.

    Collective: every rank calls it. The val set is embedded in shards and gathered to every rank; each rank embeds
    only its own :func:`shard_rows` of the bank, keeps them, and searches them (``backend="auto"``: faiss on the GPU,
    else the torch backend on ``device`` when it is a GPU, else faiss on the CPU); every rank returns the same
    ``{k: (top1, top5)}``, equal to what one rank computes. The class count is the bank's ``classes`` when it has
    them (ImageFolder, the embedded dataset), else the largest train label + 1. ``log``: rank 0's FLOP count, ETA
    and timing lines. ``bank_block``: default :data:`BANK_BLOCK`, read at call time.
    """
    bank_block = BANK_BLOCK if bank_block is None else bank_block
    device = torch.device(device) if device is not None else model_device(backbone)
    val, val_labels = extract_features(backbone, val_dataset, batch_size, num_workers, device, desc="k-NN val")
    shard = extract_bank_shard(backbone, train_dataset, batch_size, num_workers, device, bank_block, desc="k-NN train")
    num_classes = len(getattr(train_dataset, "classes", None) or []) or None
    return knn_classify_shard(shard, val, val_labels, ks=ks, T=T, backend=backend, num_classes=num_classes,
                              device=device, log=log)
