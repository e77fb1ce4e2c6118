"""``dino-simpool-knn`` / ``python -m eval.knn``: weighted k-NN evaluation of a backbone, DINO's protocol, with the
flags of DINO's and SimPool's ``eval_knn.py``. The protocol itself (and how it matches DINO's) is
:mod:`dino_simpool.evaluation.knn`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from dino_simpool import distributed as D
from dino_simpool.checkpoint import CheckpointError
from dino_simpool.cli import OneLineErrorParser, available_cpus, bool_flag, print_error
from dino_simpool.data import build_dataset
from dino_simpool.data.folder import list_subfolders
from dino_simpool.dino.augment import eval_transform
from dino_simpool.evaluation.features import UNREADABLE, extract_features
from dino_simpool.evaluation.knn import (BACKENDS, BANK_BLOCK, DEFAULT_KS, check_ks, extract_bank_shard, knn_classify,
                                         knn_classify_shard, l2_normalize, resolve_backend)

from .features import DUMP_FORMATS, load_features, save_features
from .model_args import add_model_args, build_model, model_overrides


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every flag's default: argparse's ``(default: X)``, unless the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "default" in action.help.lower():
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    workers = min(10, available_cpus())
    p = OneLineErrorParser(
        "dino-simpool-knn",
        description="Weighted k-NN evaluation of a (DINO/SimPool) backbone, DINO's protocol; the search is split "
                    "over the ranks (faiss, or torch on the GPU when faiss has none).",
        formatter_class=DefaultsHelpFormatter,
    )
    add_model_args(p, seed=True)
    p.add_num_threads_flag()
    p.add_argument("--batch_size_per_gpu", default=128, type=int, help="extraction batch per process")
    p.add_argument("--nb_knn", default=list(DEFAULT_KS), nargs="+", type=int, help="k values (one search serves all)")
    p.add_argument("--temperature", default=0.07, type=float, help="vote weight exp(sim / T)")
    p.add_argument("--use_cuda", default=True, type=bool_flag, nargs="?", const=True,
                   help="use the GPU (model and search) when one is present; false keeps everything on the CPU")
    p.add_argument("--num_workers", default=workers, type=int,
                   help=f"extraction loader workers (default: min(10, the CPUs this task may use) = {workers} here)")
    p.add_argument("--dump_features", default=None, type=str,
                   help="save L2-normalised features, labels and class names to this folder")
    p.add_argument("--dump_format", default="safetensors", choices=list(DUMP_FORMATS),
                   help="safetensors: features.safetensors; dino: DINO's trainfeat.pth, testfeat.pth, "
                        "trainlabels.pth, testlabels.pth; npy: four .npy files")
    p.add_argument("--load_features", default=None, type=str,
                   help="load dumped features from this folder (any of the three formats; no extraction)")
    p.add_argument("--data_path", default=None, type=str,
                   help="ImageFolder root with train/ and val/; not given = the embedded synthetic dataset")
    p.add_argument("--resize", default=256, type=int, help="eval transform: resize (bicubic)")
    p.add_argument("--crop", default=224, type=int, help="eval transform: center crop")
    p.add_argument("--synthetic_size", default=64, type=int, help="image size of the embedded synthetic dataset")
    p.add_argument("--output_dir", default=".", type=str, help="where knn_results.json is written")
    p.add_argument("--dist_url", default="env://", type=str, help="process-group init method")
    p.add_argument("--local_rank", "--local-rank", default=0, type=int, help="ignored (torch.distributed.launch compat)")
    p.add_argument("--backend", default="auto", choices=[*BACKENDS, "nccl", "gloo"],
                   help="auto|faiss|torch: the search backend (auto: faiss GPU, else torch on a GPU, else faiss "
                        "CPU); nccl|gloo: the process-group backend (SimPool eval_knn compat; the search is then auto)")
    p.add_argument("--search_backend", default=None, choices=list(BACKENDS), help="explicit search backend")
    p.add_argument("--dist_backend", default=None, choices=["nccl", "gloo"],
                   help="process-group backend (default: nccl with CUDA, else gloo)")
    p.add_argument("--fp16_bank", action="store_true", help="faiss GPU: store the bank in fp16")
    p.add_argument("--bank_block", default=BANK_BLOCK, type=int,
                   help="bank rows searched per step, and the unit in which the bank is split over the ranks")
    p.add_argument("--n_last_blocks", default=4, type=int, help="ignored (SimPool eval_knn compat)")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate flags and untangle ``--backend`` (search vs process group). Raises ValueError."""
    args.nb_knn = check_ks(args.nb_knn)
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0; got {args.temperature}")
    if args.batch_size_per_gpu <= 0:
        raise ValueError(f"--batch_size_per_gpu must be > 0; got {args.batch_size_per_gpu}")
    if args.resize <= 0 or args.crop <= 0 or args.crop > args.resize:
        raise ValueError(f"need 0 < --crop <= --resize; got --resize {args.resize} --crop {args.crop}")
    if args.num_workers < 0:
        raise ValueError(f"--num_workers must be >= 0; got {args.num_workers}")
    if args.bank_block < 1:
        raise ValueError(f"--bank_block must be >= 1; got {args.bank_block}")
    search, pg = "auto", args.dist_backend
    if args.backend in BACKENDS:
        search = args.backend
    elif pg is None:
        pg = args.backend
    if args.search_backend:
        search = args.search_backend
    args.search_backend, args.dist_backend = search, pg
    model_overrides(args)  # --mode/--pooling/--arch must agree: fail before any work
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


def _log(msg: str) -> None:
    if D.is_main_process():
        print(msg, flush=True)


def format_table(results: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines += [f"{'k':>6}  {'top-1':>7}  {'top-5':>7}", f"{'-' * 6}  {'-' * 7}  {'-' * 7}"]
    for k, (t1, t5) in results.items():
        lines.append(f"{k:>6}  {t1:7.2f}  {t5:7.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    env = D.init_distributed(args.dist_backend, args.dist_url)
    use_cuda = bool(args.use_cuda) and torch.cuda.is_available()
    device = D.device_for(env) if use_cuda else torch.device("cpu")
    t0 = time.time()
    shard = None  # this rank's part of the bank, when the bank is never gathered (no dump)
    if args.load_features:
        bundle = load_features(args.load_features)
        _log(f"loaded features from {args.load_features}: train {tuple(bundle['train_feats'].shape)}, "
             f"test {tuple(bundle['test_feats'].shape)}")
        classes = bundle.get("classes")
    else:
        if args.data_path:
            check_imagefolder(args.data_path)
        model = build_model(args, device, log=_log)  # first: a checkpoint/arch mismatch fails before any data work
        tf = eval_transform(args.resize, args.crop)
        ds_train = build_dataset(args.data_path, "train", transform=tf, image_size=args.synthetic_size)
        ds_val = build_dataset(args.data_path, "val", transform=tf, image_size=args.synthetic_size)
        if len(ds_train) == 0 or len(ds_val) == 0:
            raise ValueError(f"empty dataset: train has {len(ds_train)} images, val {len(ds_val)}")
        _log(f"data: {args.data_path or 'embedded synthetic dataset'}: train {len(ds_train)} images, val {len(ds_val)} "
             f"images, {len(ds_train.classes)} classes")
        classes = list(ds_train.classes)
        test_feats, test_labels = extract_features(model, ds_val, args.batch_size_per_gpu, args.num_workers,
                                                   device, desc="val features")
        test_labels = remap_val_labels(ds_train.classes, ds_val.classes, test_labels)
        bundle = {"test_feats": l2_normalize(test_feats), "test_labels": test_labels}
        if args.dump_features:  # the dump needs the whole bank: gathered to every rank
            train_feats, train_labels = extract_features(model, ds_train, args.batch_size_per_gpu, args.num_workers,
                                                         device, desc="train features")
            bundle.update(train_feats=l2_normalize(train_feats), train_labels=train_labels)
            if D.is_main_process():
                path = save_features(args.dump_features, bundle["train_feats"], train_labels, bundle["test_feats"],
                                     test_labels, classes, fmt=args.dump_format)
                _log(f"features dumped to {path} ({args.dump_format})")
        else:  # each rank embeds and keeps only its own rows of the bank
            shard = extract_bank_shard(model, ds_train, args.batch_size_per_gpu, args.num_workers, device,
                                       args.bank_block, desc="train features")
    t_feat = time.time() - t0

    num_classes = len(classes) if classes else None
    search, _ = resolve_backend(args.search_backend, device, None if use_cuda else False, max(args.nb_knn))
    opts = dict(ks=args.nb_knn, T=args.temperature, backend=args.search_backend, num_classes=num_classes,
                use_gpu=None if use_cuda else False, fp16_bank=args.fp16_bank, device=device, log=_log)
    t1 = time.time()
    if shard is None:  # the whole bank on every rank: each searches its part (knn_classify's distributed split)
        results = knn_classify(bundle["train_feats"], bundle["train_labels"], bundle["test_feats"],
                               bundle["test_labels"], distributed=True, bank_block=args.bank_block, **opts)
        n_train = int(bundle["train_feats"].shape[0])
        train_labels = bundle["train_labels"]
    else:
        results = knn_classify_shard(shard, bundle["test_feats"], bundle["test_labels"], **opts)
        train_labels = shard.labels[shard.labels != UNREADABLE]
        n_train = int(train_labels.numel())
    t_search = time.time() - t1
    if D.is_main_process():  # every rank has the same results; rank 0 reports them
        print(format_table(results, f"weighted k-NN (T={args.temperature}, {search} search)"), flush=True)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "results": {str(k): {"top1": t1_, "top5": t5_} for k, (t1_, t5_) in results.items()},
            "n_train": n_train, "n_test": int(bundle["test_feats"].shape[0]),
            "num_classes": num_classes or int(train_labels.max()) + 1,
            "temperature": args.temperature, "search_backend": search, "world_size": D.get_world_size(),
            "pretrained_weights": args.pretrained_weights or None, "checkpoint_key": args.checkpoint_key,
            "seed": None if args.pretrained_weights or args.load_features else args.seed,
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
    try:
        resolve_args(args)
        run(args)
    except (ValueError, CheckpointError, FileNotFoundError) as e:  # DataError is a ValueError
        print_error("dino-simpool-knn", e)  # all of it: a key mismatch lists the missing, unexpected, mis-shaped keys
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
