"""Frozen-backbone feature extraction, sharded over ranks (the periodic k-NN of training, ``dino-simpool-knn`` and the
linear probe's cached features all embed images through :func:`extract_features`).

:func:`extract_features` shards BOTH the train and the val set over the ranks (``DistributedSampler`` without
shuffle; DINO makes every rank embed the whole val set), gathers ``(index, feature, label)`` from every rank,
drops the duplicates the sampler adds as padding, and returns the full tensors in dataset order on every rank.
It also works without a process group (one process embeds everything).

:func:`embed_rows` embeds given rows of a dataset on this rank alone, with no communication: the periodic k-NN's
bank stays sharded over the ranks that way (each rank searches its own rows, :mod:`dino_simpool.evaluation.knn`).

Memory: a gather step moves :data:`GATHER_CHUNK` rows in total (``GATHER_CHUNK // world`` from each rank), so its
transient buffers do not grow with the number of ranks (:func:`gather_rows_per_rank`).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from dino_simpool import distributed as D
from dino_simpool.data.loader import make_loader

UNREADABLE = -1  # the label of a sample whose image could not be read (SafeImageFolder's stand-in)
GATHER_CHUNK = 65536  # feature rows one gather step collects, all ranks together (the transient buffers' size)


def gather_rows_per_rank(world: int, gather_chunk: int = GATHER_CHUNK) -> int:
    """Rows each rank sends per gather step: ``gather_chunk`` divided by the world size (at least 1), so that one
    step holds about ``gather_chunk`` rows whatever the number of ranks."""
    return max(1, int(gather_chunk) // max(1, int(world)))


class _WithIndex(Dataset):
    """``(img, label, index)`` from a dataset yielding ``(img, label)``; the label is ``UNREADABLE`` where the
    dataset says (``get_checked``) that another image stood in for an unreadable one."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        get_checked = getattr(self.ds, "get_checked", None)
        if get_checked is not None:
            img, label, ok = get_checked(i)
            return img, (label if ok else UNREADABLE), i
        img, label = self.ds[i][:2]
        return img, label, i


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (else buffer); CPU for a model with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _gather_rows(t: torch.Tensor, comm_device: torch.device) -> torch.Tensor:
    """all_gather equal-shaped tensors from every rank; returns (world * n, ...) on the CPU, rank-major (one host
    buffer: each part is copied into it, not concatenated from per-part copies)."""
    world = D.get_world_size()
    src = t.to(comm_device).contiguous()
    parts = [torch.empty_like(src) for _ in range(world)]
    dist.all_gather(parts, src)
    out = torch.empty((world * src.shape[0], *src.shape[1:]), dtype=src.dtype)
    for r, p in enumerate(parts):
        out[r * src.shape[0]:(r + 1) * src.shape[0]].copy_(p)
    return out


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 128,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    desc: str = "",
    gather_chunk: int = GATHER_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed ``dataset`` with ``model(x) -> (B, d)`` (eval mode, no grad, fp32 output).

    Returns ``(feats (N, d) float32 CPU, labels (N,) int64 CPU)`` in dataset order, on every rank, less the images
    that could not be read (a ``SafeImageFolder`` logs each one; a warning gives the count). Features are
    NOT normalised (``knn_classify`` normalises). Under a process group the work is split by a
    ``DistributedSampler(shuffle=False)``; padded duplicates are dropped, and an index that no rank embedded
    raises RuntimeError. The features travel ``gather_chunk`` rows per step, all ranks together.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError(f"cannot extract features from an empty dataset ({desc or 'dataset'})")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0; got {batch_size}")
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    world, rank = D.get_world_size(), D.get_rank()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False) \
        if D.is_dist() else None
    loader = make_loader(_WithIndex(dataset), batch_size, num_workers, sampler=sampler,
                         pin_memory=device.type == "cuda", persistent=False)
    try:
        feats, labels, idx = _embed(model, loader, device, desc, show=rank == 0)
    finally:
        model.train(was_training)
    if not D.is_dist():
        order = torch.argsort(idx)
        return _drop_unreadable(feats[order].contiguous(), labels[order].contiguous(), desc)
    feats, labels = _gather_in_dataset_order(feats, labels, idx, n, gather_rows_per_rank(world, gather_chunk))
    return _drop_unreadable(feats, labels, desc)


@torch.no_grad()
def embed_rows(
    model: torch.nn.Module,
    dataset: Dataset,
    rows: Sequence[int],
    batch_size: int = 128,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    desc: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed ``dataset[i] for i in rows`` on this process alone (no communication, whatever the process group).

    Returns ``(feats (m, d) float32 CPU, labels (m,) int64, index (m,) int64)`` in the order of ``rows``, less the
    rows whose image could not be read (``index`` says which rows are left; ``m`` may be 0, then ``d`` is 0).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0; got {batch_size}")
    device = torch.device(device) if device is not None else model_device(model)
    rows = list(rows)
    if not rows:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    was_training = model.training
    model.eval()
    loader = make_loader(_WithIndex(dataset), batch_size, num_workers, sampler=rows, pin_memory=device.type == "cuda",
                         persistent=False)
    try:
        feats, labels, idx = _embed(model, loader, device, desc, show=D.get_rank() == 0)
    finally:
        model.train(was_training)
    ok = labels != UNREADABLE
    if bool(ok.all()):
        return feats, labels, idx
    return feats[ok].contiguous(), labels[ok].contiguous(), idx[ok].contiguous()


def _embed(model: torch.nn.Module, loader: DataLoader, device: torch.device, desc: str, show: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's ``(feats, labels, dataset indices)``, in loader order. The features go straight into one host
    buffer sized for all of this rank's rows (no per-batch list and concatenated copy: 1x, not 2x, the rows)."""
    bar = tqdm(total=len(loader), desc=desc or "features", unit="batch", disable=not show, dynamic_ncols=True,
               mininterval=1.0)
    total = len(loader.sampler)
    feats = None
    labels = torch.empty(total, dtype=torch.long)
    idxs = torch.empty(total, dtype=torch.long)
    pos = 0
    try:
        for img, label, idx in loader:
            out = model(img.to(device, non_blocking=True))
            if isinstance(out, (tuple, list)):
                out = out[0]
            if out.ndim != 2:
                raise ValueError(f"the model must return (B, d) features; got shape {tuple(out.shape)}")
            if feats is None:
                feats = torch.empty(total, out.shape[1], dtype=torch.float32)
            b = out.shape[0]
            feats[pos:pos + b].copy_(out)
            labels[pos:pos + b] = torch.as_tensor(label).long().reshape(-1)
            idxs[pos:pos + b] = torch.as_tensor(idx).long().reshape(-1)
            pos += b
            bar.update(1)
    finally:
        bar.close()
    if feats is None:
        return torch.empty(0, 0), labels[:0], idxs[:0]
    if pos != total:
        raise RuntimeError(f"the loader yielded {pos} rows where its sampler has {total}; this is a bug")
    return feats, labels, idxs


def _gather_in_dataset_order(feats_l: torch.Tensor, labels_l: torch.Tensor, idx_l: torch.Tensor, n: int,
                             gather_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows, gathered onto every rank as ``(feats (n, d), labels (n,))`` in dataset order, one row per
    index (the sampler's padding dropped); the features travel ``gather_chunk`` rows per rank at a time
    (:func:`gather_rows_per_rank` of the total)."""
    world = D.get_world_size()
    # Every rank ran ceil(n / world) samples (DistributedSampler pads), so all shapes match for all_gather.
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    d = torch.tensor([feats_l.shape[1]], dtype=torch.long)
    dims = _gather_rows(d, comm)
    if int(dims.min()) != int(dims.max()):
        raise RuntimeError(f"ranks produced features of different sizes: {dims.tolist()}")
    dim = int(dims[0])
    all_idx = _gather_rows(idx_l, comm)
    all_lab = _gather_rows(labels_l, comm)
    # Dedupe: keep one row per dataset index (the first in rank-major order; padding repeats the first indices).
    m = all_idx.numel()
    pos_all = torch.arange(m)
    first = torch.full((n,), m, dtype=torch.long).scatter_reduce_(0, all_idx, pos_all, reduce="amin")
    keep = first[all_idx] == pos_all
    seen = first < m
    if not bool(seen.all()):
        missing = (~seen).nonzero().flatten()[:10].tolist()
        raise RuntimeError(f"feature gathering lost dataset indices {missing}...; this is a bug")
    out_feats = torch.empty(n, dim, dtype=torch.float32)
    out_labels = torch.empty(n, dtype=torch.long)
    out_labels[all_idx[keep]] = all_lab[keep]
    # gather the features in row chunks so that the transient buffers stay small
    n_local = feats_l.shape[0]
    for s in range(0, n_local, gather_chunk):
        part = _gather_rows(feats_l[s:s + gather_chunk], comm)  # (world * c, d), rank-major
        c = min(gather_chunk, n_local - s)
        pos = torch.arange(world).view(-1, 1) * n_local + torch.arange(s, s + c).view(1, -1)  # rows in all_idx
        pos = pos.reshape(-1)
        k = keep[pos]
        out_feats[all_idx[pos][k]] = part[k]
    return out_feats, out_labels


def _drop_unreadable(feats: torch.Tensor, labels: torch.Tensor, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave out the rows of unreadable images (each was logged with its path when it was skipped)."""
    ok = labels != UNREADABLE
    if bool(ok.all()):
        return feats, labels
    if D.get_rank() == 0:
        warnings.warn(f"{desc or 'features'}: {int((~ok).sum())} unreadable image(s) left out "
                      f"({int(ok.sum())} of {labels.numel()} kept)", stacklevel=3)
    return feats[ok].contiguous(), labels[ok].contiguous()
