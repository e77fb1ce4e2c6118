"""The DINO training loop: student/teacher, EMA, precision, periodic k-NN, checkpoints, resume and preemption.

``train(cfg) -> exit code`` (see ``dino_simpool.signals``): 0 done, 75 saved after SIGUSR1/SIGTERM, 3 non-finite loss.

* student = ``MultiCropWrapper(build_backbone(...), DINOHead(...))``; the teacher is the same architecture with the
  **same** gamma (the official fork gave the ViT teacher gamma 1.25 whatever ``--gamma`` said), no drop-path, no
  gradients, initialised from the student and updated by EMA with a cosine momentum. Only the 2 global crops go
  through the teacher. The student is wrapped in DDP when distributed; the teacher never is (its BatchNorm buffers
  are broadcast from rank 0 after every step, as DINO's DDP-wrapped teacher did; on CUDA BN layers are also SyncBN).
* Schedules are per iteration (lr warm-up + cosine, cosine wd, cosine teacher momentum); the teacher temperature is
  per epoch (inside ``DINOLoss``).
* Resume: rerunning the same command continues from ``output_dir/checkpoint.pth``, at an epoch boundary or at the
  iteration where SIGUSR1/SIGTERM stopped it. Every random draw is a function of the seed and the position in
  training (``dino_simpool.dino.determinism``), so on CPU the resumed run ends bit-identical to an uninterrupted one.

Test-only hooks (environment variables, never set in normal use): ``DINO_SIMPOOL_TEST_NAN_AT=I`` makes the loss of
global iteration I non-finite; ``DINO_SIMPOOL_TEST_SIGNAL_AT=I`` sends SIGTERM to this process during iteration I;
``DINO_SIMPOOL_TEST_DUMP_RANKS=1`` makes every rank write its final teacher to ``teacher_rank{r}.pth``.
"""
from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from dino_simpool import distributed as D
from dino_simpool.augment import build_multicrop
from dino_simpool.checkpoint import CheckpointError, load_checkpoint, save_atomic
from dino_simpool.data import DataError, build_dataset
from dino_simpool.dino.augment import eval_transform
from dino_simpool.dino.config import TrainConfig
from dino_simpool.dino.determinism import (ResumableDistributedSampler, SeededDataset, get_rng_state, rng_isolated,
                                           seed_all, seed_step, set_rng_state)
from dino_simpool.dino.head import DINOHead, MultiCropWrapper
from dino_simpool.dino.loss import DINOLoss
from dino_simpool.dino.optim import (apply_schedules, build_optimizer, cancel_gradients_last_layer, clip_gradients,
                                     ema_update, param_groups)
from dino_simpool.dino.schedules import cosine_scheduler, scaled_lr
from dino_simpool.logs import Logger, Progress, format_seconds
from dino_simpool.models.backbones import build_backbone
from dino_simpool.signals import (EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, PreemptionFlag,
                                  ignore_stop_signals_in_worker)

CHECKPOINT_NAME = "checkpoint.pth"
CHECKPOINT_KEYS = ("student", "teacher", "optimizer", "dino_loss", "epoch", "iteration", "iter_in_epoch", "config")


# ---------------------------------------------------------------------------------------------------- building
def backbone_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The ``build_backbone`` arguments shared by student and teacher (same gamma for both)."""
    kw: dict[str, Any] = dict(arch=cfg.arch, pooling=cfg.pooling, gamma=cfg.gamma, patch_size=cfg.patch_size,
                              img_size=cfg.global_crops_size)
    for name in ("depth", "embed_dim", "num_heads"):
        if getattr(cfg, name) is not None:
            kw[name] = getattr(cfg, name)
    return kw


def build_student_teacher(cfg: TrainConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with drop-path) and teacher (no drop-path, same gamma), teacher = copy of the student, frozen."""
    kw = backbone_kwargs(cfg)
    student_bb = build_backbone(**kw, drop_path_rate=cfg.drop_path_rate)
    teacher_bb = build_backbone(**kw, drop_path_rate=0.0)
    dim = student_bb.embed_dim
    student = MultiCropWrapper(student_bb, DINOHead(dim, cfg.out_dim, use_bn=cfg.use_bn_in_head,
                                                    norm_last_layer=cfg.norm_last_layer))
    teacher = MultiCropWrapper(teacher_bb, DINOHead(dim, cfg.out_dim, use_bn=cfg.use_bn_in_head))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def init_from_pretrained(student: MultiCropWrapper, teacher: MultiCropWrapper, path: str,
                         checkpoint_key: str | None = "teacher") -> dict:
    """Start the student's backbone from ``path`` (strict, any format ``load_pretrained`` reads) and copy it into the
    teacher; the heads keep their fresh init. The model keeps this project's numerics (``compat=None``: per-sample
    SimPool min, timm position-embedding interpolation), which training should not inherit from the official code."""
    from dino_simpool.models.weights import load_pretrained

    report = load_pretrained(student.backbone, path, checkpoint_key=checkpoint_key, compat=None)
    teacher.backbone.load_state_dict(student.backbone.state_dict())
    return report


def unwrap(model: nn.Module) -> nn.Module:
    """DDP (or any ``.module`` wrapper) → the wrapped module; by attribute, whatever the architecture."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return model


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Make every rank's buffers (BatchNorm running stats) equal to rank ``src``'s."""
    if not D.is_dist():
        return
    for b in model.buffers():
        dist.broadcast(b.data, src)


def init_loader_worker(worker_id: int, nice: int = 0) -> None:
    """``worker_init_fn``: ignore the stop signals (the main process handles them) and lower the worker's priority
    by ``nice``. On a CPU-only machine the workers and the step's threads share the cores; niced workers let the
    step's threads run undisturbed and fill the cores' idle time (benchmarks/train_step.py measures the effect)."""
    ignore_stop_signals_in_worker(worker_id)
    if nice:
        os.nice(nice)


def make_loader(dataset, sampler, cfg: TrainConfig, device: torch.device, collate_fn=None) -> DataLoader:
    return DataLoader(
        dataset, batch_size=cfg.batch_size_per_gpu, sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=cfg.num_workers > 0,
        worker_init_fn=functools.partial(init_loader_worker, nice=cfg.loader_nice or 0)
        if cfg.num_workers > 0 else None,
        # its own generator: creating an iterator must not draw from the global RNG (resume identity)
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) if needed; ValueError with a one-line message if it cannot be a writable folder."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} exists and is not a folder; pass a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output_dir {out} cannot be created ({e.strerror or type(e).__name__}); "
                         f"pass a writable folder path") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir {out} is not writable; pass a writable folder path")
    return out


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


# ---------------------------------------------------------------------------------------------------- k-NN
def knn_eval(teacher: nn.Module, cfg: TrainConfig, datasets, device: torch.device) -> dict[str, Any]:
    """k-NN top-1/top-5 of the teacher backbone on val (train bank); every rank takes part in the extraction."""
    from eval.features import extract_features
    from eval.knn import knn_classify

    train_ds, val_ds = datasets
    backbone = unwrap(teacher).backbone  # works for DDP-wrapped and plain teachers alike
    was_training = backbone.training
    try:
        bs = max(cfg.batch_size_per_gpu, 64)
        tf, tl = extract_features(backbone, train_ds, batch_size=bs, num_workers=cfg.num_workers, device=device,
                                  desc="k-NN train")
        vf, vl = extract_features(backbone, val_ds, batch_size=bs, num_workers=cfg.num_workers, device=device,
                                  desc="k-NN val")
    finally:
        backbone.train(was_training)
    out: dict[str, Any] = {}
    if D.is_main_process():
        ncls = len(getattr(train_ds, "classes", [])) or None
        res = knn_classify(tf, tl, vf, vl, ks=tuple(cfg.nb_knn), T=cfg.temperature, num_classes=ncls)
        out = {str(k): {"top1": float(v[0]), "top5": float(v[1])} for k, v in res.items()}
    D.barrier()
    return out


# ---------------------------------------------------------------------------------------------------- checkpoint
def _gather_rng() -> dict:
    state = get_rng_state()
    if not D.is_dist():
        return {"world_size": 1, "per_rank": [state]}
    states: list[Any] = [None] * D.get_world_size()
    dist.all_gather_object(states, state)
    return {"world_size": D.get_world_size(), "per_rank": states}


def resume_checkpoint_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_NAME


# ---------------------------------------------------------------------------------------------------- train
class Stop(Exception):
    def __init__(self, code: int):
        self.code = code


def train(cfg: TrainConfig, on_epoch_end: Callable[[dict], None] | None = None) -> int:
    """Run (or resume) DINO pretraining as configured; returns the process exit code."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.resolve(device_type)
    prepare_output_dir(cfg.output_dir)  # every rank, before any process group: a bad path stops all of them alike
    # Handlers go in first: a SIGUSR1/SIGTERM during start-up (data, models, resume) is then honoured at the first
    # iteration boundary instead of killing the process with nothing saved.
    preempt = PreemptionFlag().install()
    try:
        env = D.init_distributed(cfg.backend, cfg.dist_url)
        try:
            return _train(cfg, env, on_epoch_end, preempt)
        finally:
            D.cleanup()
    finally:
        preempt.restore()


def _train(cfg: TrainConfig, env, on_epoch_end, preempt: PreemptionFlag) -> int:
    device = D.device_for(env)
    rank, world = D.get_rank(), D.get_world_size()
    main = rank == 0
    out = Path(cfg.output_dir)
    log = Logger(out, main=main)
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ---------------- data (errors before any work)
    if cfg.data_path is None:
        log.info("no --data_path: training on the embedded SyntheticShapes dataset; flags not given take its small "
                 "defaults (the demo's configuration, [embedded: ...] in --help; resolved values in config.yaml)")
    aug = build_multicrop(cfg.global_crops_scale, cfg.local_crops_scale, cfg.local_crops_number,
                          global_size=cfg.global_crops_size, local_size=cfg.local_crops_size,
                          pipeline=getattr(cfg, "aug_pipeline", None), device=device, backend=cfg.aug_backend)
    data_kw = dict(subset=cfg.subset, image_size=cfg.synthetic_size, images_per_class=cfg.synthetic_per_class)
    train_set = aug.prepare_dataset(build_dataset(cfg.data_path, "train", transform=aug.transform, **data_kw))
    sampler = ResumableDistributedSampler(len(train_set), num_replicas=world, rank=rank, seed=cfg.seed,
                                          shuffle=True, batch_size=cfg.batch_size_per_gpu, drop_last=True)
    niter = sampler.batches_per_epoch
    if niter < 1:
        raise DataError(f"the training set has {len(train_set)} images: with {world} process(es) and "
                        f"--batch_size_per_gpu {cfg.batch_size_per_gpu} not one full batch per process; lower "
                        f"--batch_size_per_gpu or use more data")
    loader = make_loader(SeededDataset(train_set, cfg.seed), sampler, cfg, device, collate_fn=aug.collate_fn)
    knn_sets = None
    if cfg.eval_every > 0:
        resize = int(round(cfg.global_crops_size * 256 / 224))
        etf = eval_transform(resize=resize, crop=cfg.global_crops_size)
        try:
            val_set = build_dataset(cfg.data_path, "val", transform=etf, image_size=cfg.synthetic_size)
        except DataError as e:
            raise DataError(f"{e} (the periodic k-NN needs the val split; pass --eval_every 0 to train without it)")
        knn_sets = (build_dataset(cfg.data_path, "train", transform=etf, **data_kw), val_set)

    # ---------------- models (same initial weights on every rank)
    seed_all(cfg.seed)
    student, teacher = build_student_teacher(cfg)
    ckpt_path = resume_checkpoint_path(out)
    if cfg.pretrained_weights and not ckpt_path.is_file():  # a resume brings its own weights
        report = init_from_pretrained(student, teacher, cfg.pretrained_weights, cfg.checkpoint_key)
        log.info(f"backbone initialised from {cfg.pretrained_weights} ({report.get('format')}, "
                 f"key {report.get('checkpoint_key')}, {report.get('loaded')} tensors)")
    student.to(device)
    teacher.to(device)
    if D.is_dist() and device.type == "cuda" and has_batchnorm(student):
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    teacher.train()  # as DINO: BN layers of the teacher use batch statistics
    student_ddp: nn.Module = student
    if D.is_dist():
        student_ddp = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    backbone_config = dict(student.backbone.config)
    backbone_config["drop_path_rate"] = 0.0  # the teacher's (what a checkpoint's user rebuilds)

    optimizer = build_optimizer(cfg.optimizer, param_groups(student))
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    dino_loss = DINOLoss(cfg.out_dim, cfg.ncrops, cfg.warmup_teacher_temp, cfg.teacher_temp,
                         cfg.warmup_teacher_temp_epochs, cfg.epochs).to(device)

    # ---------------- schedules (per iteration)
    peak_lr = scaled_lr(cfg.lr, cfg.batch_size_per_gpu * world)
    lr_schedule = cosine_scheduler(peak_lr, cfg.min_lr, cfg.epochs, niter, warmup_epochs=cfg.warmup_epochs)
    wd_schedule = cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, niter)
    momentum_schedule = cosine_scheduler(cfg.momentum_teacher, 1.0, cfg.epochs, niter)

    config_dict = cfg.to_dict()
    config_dict["backbone"] = backbone_config
    config_dict["world_size"] = world
    config_dict["iterations_per_epoch"] = niter
    if main:
        cfg.save_yaml(out / "config.yaml")

    def save(next_epoch: int, iter_in_epoch: int, iteration: int, extra: Path | None = None) -> None:
        rng = _gather_rng()
        if main:
            state = {
                "student": unwrap(student).state_dict(),
                "teacher": unwrap(teacher).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "dino_loss": {"center": dino_loss.center.detach().cpu()},
                "epoch": int(next_epoch),
                "iteration": int(iteration),
                "iter_in_epoch": int(iter_in_epoch),
                "config": config_dict,
                "rng": rng,
            }
            save_atomic(state, ckpt_path)
            if extra is not None:
                save_atomic(state, extra)
        D.barrier()  # nobody exits (and makes torchrun kill rank 0) before the file is complete

    # ---------------- resume
    start_epoch, start_iter, iteration = 0, 0, 0
    if ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
        if missing:
            raise CheckpointError(f"{ckpt_path} is not a training checkpoint of this project (missing {missing}); "
                                  f"move it away or use another --output_dir")
        try:
            unwrap(student).load_state_dict(ck["student"])
            unwrap(teacher).load_state_dict(ck["teacher"])
        except RuntimeError as e:
            raise CheckpointError(f"{ckpt_path} does not match the model built from these flags "
                                  f"({str(e).splitlines()[0]} ...); resume with the flags of that run "
                                  f"(see {out / 'config.yaml'}) or use another --output_dir") from None
        try:
            optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{ckpt_path}: optimizer state does not match --optimizer {cfg.optimizer} ({e}); "
                                  f"resume with the flags of that run or use another --output_dir") from None
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        dino_loss.center.copy_(ck["dino_loss"]["center"].to(device))
        start_epoch, start_iter, iteration = int(ck["epoch"]), int(ck["iter_in_epoch"]), int(ck["iteration"])
        if iteration != start_epoch * niter + start_iter or start_iter >= niter:
            raise CheckpointError(
                f"{ckpt_path} was written with a different number of iterations per epoch (it is at epoch "
                f"{start_epoch}, iteration {iteration}, {start_iter} in the epoch; now an epoch has {niter}): resume "
                f"with the same batch size, number of processes and data, or use another --output_dir")
        rng = ck.get("rng") or {}
        per_rank = rng.get("per_rank") or []
        if rng.get("world_size") == world and len(per_rank) > rank:
            set_rng_state(per_rank[rank])
        log.info(f"resuming from {ckpt_path} at epoch {start_epoch} iteration {iteration}")
        log.event({"event": "resume", "epoch": start_epoch, "iteration": iteration, "iter_in_epoch": start_iter,
                   "path": str(ckpt_path)})
        del ck
    else:
        log.event({"event": "start", "config": config_dict})

    if start_epoch >= cfg.epochs or (cfg.max_iters is not None and iteration >= cfg.max_iters):
        log.info(f"nothing to do: the checkpoint is at epoch {start_epoch}/{cfg.epochs}, iteration {iteration}")
        return EXIT_OK

    nparams = sum(p.numel() for p in unwrap(student).parameters())
    log.info(f"dino-simpool: {cfg.arch} pooling={cfg.pooling} gamma={backbone_config.get('gamma')} "
             f"drop_path={cfg.drop_path_rate:g} "
             f"params={nparams / 1e6:.2f}M | {len(train_set)} images, {niter} it/epoch x {cfg.epochs} epochs, "
             f"batch {cfg.batch_size_per_gpu}x{world} | {cfg.precision} on {device} | out {out}")

    nan_at = _env_int("DINO_SIMPOOL_TEST_NAN_AT")
    signal_at = _env_int("DINO_SIMPOOL_TEST_SIGNAL_AT")
    flags_device = device if (D.is_dist() and dist.get_backend() == "nccl") else torch.device("cpu")
    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch, start_iter)
            student_ddp.train()
            teacher.train()
            progress = Progress(niter, epoch, cfg.epochs, start=start_iter, every=cfg.log_every, enabled=main)
            sums = torch.zeros(4, dtype=torch.float64)  # loss, entropy, kl, count
            stop_code: int | None = None
            t_epoch = time.perf_counter()
            i = start_iter
            for i, (images, _labels) in enumerate(loader, start=start_iter):
                it = epoch * niter + i
                seed_step(cfg.seed, rank, it)
                apply_schedules(optimizer, float(lr_schedule[it]), float(wd_schedule[it]))
                images = aug.to_device(images, device)  # stage 2 of the multi-crop for the device pipelines
                if signal_at is not None and it == signal_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                with autocast():
                    with torch.no_grad():
                        teacher_out = teacher(images[:2])
                    student_out = student_ddp(images)
                    loss = dino_loss(student_out, teacher_out, epoch)
                if nan_at is not None and it == nan_at:
                    loss = loss * float("nan")
                # one small all_reduce: [non-finite loss on some rank, a stop signal on some rank]
                flags = torch.stack([(~torch.isfinite(loss.detach())).float().cpu(),
                                     torch.tensor(float(preempt.set))])
                if D.is_dist():
                    flags = flags.to(flags_device)
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                nonfinite, stop_requested = (bool(v > 0) for v in flags.tolist())
                if nonfinite:
                    progress.close()
                    msg = (f"stopping: non-finite loss ({float(loss.detach()):.4g} on rank {rank}; some rank saw a "
                           f"non-finite value) at epoch {epoch}, iteration {i}/{niter} of the epoch, global step {it} "
                           f"(lr {lr_schedule[it]:.3g}, precision {cfg.precision}). Nothing was saved: "
                           f"{ckpt_path if ckpt_path.exists() else 'no checkpoint yet'} is the last good state. "
                           f"Usual fixes: --precision bf16 instead of fp16 (--use_fp16 False), --clip_grad 0.3-3.0, "
                           f"a lower --lr (now {cfg.lr:g}), or more --warmup_epochs.")
                    if main:
                        print(msg, file=sys.stderr, flush=True)
                    log.event({"event": "nonfinite_loss", "epoch": epoch, "iteration": it, "iter_in_epoch": i,
                               "loss": float(loss.detach())})
                    raise Stop(EXIT_NONFINITE)

                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if cfg.clip_grad > 0:
                        scaler.unscale_(optimizer)
                        clip_gradients(student, cfg.clip_grad, cfg.clip_grad_mode)
                    cancel_gradients_last_layer(epoch, student, cfg.freeze_last_layer)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if cfg.clip_grad > 0:
                        clip_gradients(student, cfg.clip_grad, cfg.clip_grad_mode)
                    cancel_gradients_last_layer(epoch, student, cfg.freeze_last_layer)
                    optimizer.step()
                ema_update(teacher, student, float(momentum_schedule[it]))
                if D.is_dist():
                    broadcast_buffers(teacher)

                st = dino_loss.last_stats
                vals = torch.stack([st.loss, st.entropy, st.kl]).double().cpu()
                sums[:3] += vals
                sums[3] += 1
                iteration = it + 1
                if main:
                    progress.update(1, loss=float(vals[0]), lr=float(lr_schedule[it]))
                    if iteration % cfg.log_every == 0:
                        log.scalars("train", {"loss": vals[0], "teacher_entropy": vals[1], "kl": vals[2],
                                              "lr": lr_schedule[it], "wd": wd_schedule[it],
                                              "momentum": momentum_schedule[it]}, iteration)
                done = i + 1
                if stop_requested or (cfg.max_iters is not None and iteration >= cfg.max_iters):
                    stop_code = EXIT_PREEMPTED if stop_requested else EXIT_OK
                    if done < niter:  # mid-epoch: save here; the resumed run continues at this iteration
                        progress.close()
                        save(epoch, done, iteration)
                        why = f"signal {preempt.name}" if stop_requested else f"--max_iters {cfg.max_iters}"
                        log.info(f"stopped by {why} at epoch {epoch} iteration {iteration} ({done}/{niter} of the "
                                 f"epoch); saved {ckpt_path}")
                        log.event({"event": "preempted" if stop_requested else "max_iters", "epoch": epoch,
                                   "iteration": iteration, "iter_in_epoch": done})
                        raise Stop(stop_code)
                    break
            progress.close()
            start_iter = 0

            # ---------------- end of epoch: checkpoint, k-NN, summary
            extra = out / f"checkpoint{epoch:04}.pth" if cfg.saveckp_freq and epoch % cfg.saveckp_freq == 0 else None
            save(epoch + 1, 0, iteration, extra)
            if stop_code is None and D.is_dist():  # a signal that arrived after the last step of the epoch
                if any(bool(v) for v in _any_rank_flag(preempt.set, flags_device)):
                    stop_code = EXIT_PREEMPTED
            elif stop_code is None and preempt.set:
                stop_code = EXIT_PREEMPTED
            if D.is_dist():
                sums = sums.to(flags_device)
                dist.all_reduce(sums)
                sums = sums.cpu() / world
            n = max(float(sums[3]), 1.0)
            elapsed = time.perf_counter() - t_epoch
            it_last = max(iteration - 1, 0)
            record: dict[str, Any] = {
                "epoch": epoch, "iteration": iteration, "loss": float(sums[0]) / n,
                "teacher_entropy": float(sums[1]) / n, "kl": float(sums[2]) / n,
                "lr": float(lr_schedule[it_last]), "wd": float(wd_schedule[it_last]),
                "momentum": float(momentum_schedule[it_last]), "teacher_temp": dino_loss.teacher_temp(epoch),
                "epoch_time_s": round(elapsed, 3),
                "images_per_s": round(sums[3].item() * cfg.batch_size_per_gpu * world / max(elapsed, 1e-9), 2),
            }
            if (stop_code is None and knn_sets is not None
                    and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs - 1)):
                t_knn = time.perf_counter()
                with rng_isolated():  # evaluation must not change the training's random stream
                    record["k-NN"] = knn_eval(teacher, cfg, knn_sets, device)
                record["knn_time_s"] = round(time.perf_counter() - t_knn, 3)
            log.event(record)
            log.scalars("epoch", {k: v for k, v in record.items() if k != "epoch"}, epoch)
            for k, v in (record.get("k-NN") or {}).items():
                log.scalars("knn", {f"top1_k{k}": v["top1"], f"top5_k{k}": v["top5"]}, epoch)
            knn_txt = ""
            if record.get("k-NN"):
                k20 = "20" if "20" in record["k-NN"] else next(iter(record["k-NN"]))
                knn_txt = f" | k-NN@{k20} top1 {record['k-NN'][k20]['top1']:.2f}"
            log.info(f"epoch {epoch}/{cfg.epochs} done: loss {record['loss']:.4f} lr {record['lr']:.3g} "
                     f"H(teacher) {record['teacher_entropy']:.3f} | {record['images_per_s']:.1f} img/s, "
                     f"{format_seconds(elapsed)}{knn_txt} | total {format_seconds(time.perf_counter() - t_start)}")
            log.tb.flush()
            if on_epoch_end is not None and main:
                on_epoch_end(record)
            if stop_code is not None:
                if stop_code == EXIT_PREEMPTED:
                    log.info(f"stopped by a signal at the end of epoch {epoch}; saved {ckpt_path}")
                    log.event({"event": "preempted", "epoch": epoch + 1, "iteration": iteration, "iter_in_epoch": 0})
                else:
                    log.info(f"stopped by --max_iters {cfg.max_iters} at iteration {iteration}; saved {ckpt_path}")
                    log.event({"event": "max_iters", "epoch": epoch + 1, "iteration": iteration, "iter_in_epoch": 0})
                raise Stop(stop_code)
        if os.environ.get("DINO_SIMPOOL_TEST_DUMP_RANKS"):  # test-only: each rank's final teacher, to compare ranks
            torch.save(unwrap(teacher).state_dict(), out / f"teacher_rank{rank}.pth")
        log.event({"event": "done", "epoch": cfg.epochs, "iteration": iteration,
                   "time_s": round(time.perf_counter() - t_start, 3)})
        log.info(f"training done in {format_seconds(time.perf_counter() - t_start)}; checkpoint {ckpt_path}")
        return EXIT_OK
    except Stop as s:
        return s.code
    finally:
        log.close()


def _any_rank_flag(flag: bool, device: torch.device) -> list[float]:
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
