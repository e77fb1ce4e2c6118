"""The supervised training loop: build, resume, loop over epochs (train, validate, save), as timm's ``train.py``.

It shares the DINO trainer's parts: the process group (``dino_simpool.distributed``), the output folder and its lock
(``rundir``), atomic checkpoints and the resume point (``checkpoint.Checkpointer``), stop signals and exit codes
(``signals``), the loaders whose workers always end (``data.loader``), the logs, and the seeded draws that make resume
bit-identical on CPU (``dino.determinism``: the sampler and transform draws are functions of (seed, epoch, index),
those of the step, mixup's included, of (seed, rank, iteration)).

* Schedules: timm's ``create_scheduler_v2``, stepped per epoch (or per iteration with ``--sched-on-updates``), set
  before every epoch/iteration from its position, so a resumed run gets the same values.
* Each epoch: top-1/top-5 on val (and of the EMA). ``checkpoint.pth`` is the resume point (also mid-epoch after a
  stop signal); ``checkpoint_best.pth`` holds the epoch with the best val top-1 (the EMA's with ``--model-ema``, as
  timm). Both store ``model`` (``backbone.*`` + ``head.*``), ``model_ema`` (with ``--model-ema``) and
  ``config["backbone"]``, which every evaluator reads (``--checkpoint_key model``, the default when a checkpoint has
  no ``teacher``, or ``model_ema``).
* Exit codes: 0 done, 75 saved after SIGUSR1/SIGTERM, 3 non-finite loss (nothing saved after the last good state).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.layers import convert_splitbn_model
from timm.utils import ModelEmaV3, distribute_bn
from torch import nn

from dino_simpool import distributed as D
from dino_simpool.checkpoint import (CHECKPOINT_NAME, Checkpointer, CheckpointError, describe_key_mismatch,
                                     remove_stale_temporaries, save_atomic)
from dino_simpool.data.loader import end_workers
from dino_simpool.dino.determinism import gather_rng_state, restore_position, seed_all, seed_step
from dino_simpool.dino.step import agree
from dino_simpool.logs import Logger, Progress, format_seconds, log_stop
from dino_simpool.job import run_job
from dino_simpool.signals import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, PreemptionFlag, any_rank
from dino_simpool.supervised.config import SupervisedConfig
from dino_simpool.supervised.data import (build_datasets, build_loaders, build_loss, build_mixup, num_classes_of,
                                          validate)
from dino_simpool.supervised.model import Classifier, build_classifier
from dino_simpool.supervised.step import StepSettings, SupervisedStep

BEST_NAME = "checkpoint_best.pth"
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "iteration", "iter_in_epoch", "config")
# options that do not change the numbers a run produces: free to differ on resume
RUN_ONLY = {"data_dir", "output", "workers", "log_interval", "max_iters", "backend", "dist_url", "saveckp_freq",
            "attention_images", "validation_batch_size"}


@dataclass
class Hooks:
    """Callbacks into the loop. ``on_epoch_end(record)``: main process, after each epoch. The others inject faults
    for tests (tests/supervised_hooks.py): ``before_step(it)`` before global iteration ``it`` on every rank,
    ``poison_loss(it)`` makes that iteration's loss NaN, ``on_train_end(model, rank)`` sees each rank's final
    model."""
    on_epoch_end: Callable[[dict], None] | None = None
    before_step: Callable[[int], None] | None = None
    poison_loss: Callable[[int], bool] | None = None
    on_train_end: Callable[[nn.Module, int], None] | None = None


class Stop(Exception):
    def __init__(self, code: int):
        self.code = code


def train(cfg: SupervisedConfig, hooks: Hooks | None = None, stop: PreemptionFlag | None = None) -> int:
    """Run (or resume) supervised training as configured; returns the process exit code (``dino_simpool.job``:
    lock, process group, watchdog, stop handlers).

    ``stop``: a stop-signal flag the caller installed earlier (the command line does, before its imports)."""
    hooks = hooks or Hooks()
    return run_job(cfg.output, cfg.backend, cfg.dist_url, lambda env, flag: _train(cfg, env, hooks, flag), stop)


def _train(cfg: SupervisedConfig, env: D.DistEnv, hooks: Hooks, stop: PreemptionFlag) -> int:
    device = D.device_for(env)
    rank, world = D.get_rank(), D.get_world_size()
    main = rank == 0
    out = Path(cfg.output)
    log = Logger(out, main=main)
    t_start = time.perf_counter()
    if cfg.data_dir is None:
        log.info("no --data-dir: training on the embedded SyntheticShapes dataset; options not given take its small "
                 "defaults ([embedded: ...] in --help; resolved values in config.yaml)")
    train_set, val_set = build_datasets(cfg)
    ncls = num_classes_of(cfg, train_set)
    sampler, loader, val_loader = build_loaders(cfg, train_set, val_set, rank, world, device.type == "cuda")
    niter = sampler.batches_per_epoch
    try:
        seed_all(cfg.seed)  # the same initial weights on every rank
        run = build_run(cfg, ncls, niter, world, device)
        ckpt = Checkpointer(out, main, cfg.saveckp_freq)
        if main:
            remove_stale_temporaries(out, (CHECKPOINT_NAME, BEST_NAME))
        resume_from = ckpt.load(CHECKPOINT_KEYS)
        config_dict = {**cfg.to_dict(), "lr": run.lr, "num_classes": ncls, "classes": list(train_set.classes),
                       "backbone": {**run.model.backbone.config, "drop_path_rate": 0.0}, "world_size": world,
                       "iterations_per_epoch": niter, "total_epochs": run.epochs}
        state = TrainState(run, config_dict, ckpt)
        if main:
            cfg.save_yaml(out / "config.yaml")
        epoch0, iter0, iteration = state.resume(resume_from, niter, rank, world, log) if resume_from else (0, 0, 0)
        if resume_from is None:
            log.event({"event": "start", "config": config_dict})
        del resume_from
        if epoch0 >= run.epochs or (cfg.max_iters is not None and iteration >= cfg.max_iters):
            log.info(f"nothing to do: the checkpoint is at epoch {epoch0}/{run.epochs}, iteration {iteration}")
            return EXIT_OK
        log.info(f"dino-simpool-supervised: {cfg.arch} pooling={cfg.pooling} gamma={run.model.backbone.config['gamma']} "
                 f"params={sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M, {ncls} classes | "
                 f"{len(train_set)} train / {len(val_set)} val images, {niter} it/epoch x {run.epochs} epochs, batch "
                 f"{cfg.batch_size}x{world}, {cfg.opt} lr {run.lr:.3g} | {cfg.precision} on {device} | out {out}")
        record: dict[str, Any] = {}
        for epoch in range(epoch0, run.epochs):
            t_epoch = time.perf_counter()
            sampler.set_epoch(epoch, iter0)
            sums, iteration, stop_code = run_epoch(run, loader, cfg, epoch, iter0, niter, stop, hooks, state, log)
            iter0 = 0
            record = end_epoch(run, val_loader, cfg, epoch, iteration, sums, world, device, state,
                               time.perf_counter() - t_epoch)
            if stop_code is None and any_rank([stop.set], device)[0]:  # a signal after the epoch's last step
                stop_code = EXIT_PREEMPTED
            log_epoch(log, record, run.epochs, time.perf_counter() - t_start)
            if hooks.on_epoch_end is not None and main:
                hooks.on_epoch_end(record)
            if stop_code is not None:
                log_stop(log, stop_code, epoch + 1, iteration, 0, ckpt.path, stop.name, cfg.max_iters,
                         max_iters_flag="--max-iters")
                return stop_code
        if hooks.on_train_end is not None:
            hooks.on_train_end(run.model, rank)
        chance = 100.0 / ncls
        best = state.best
        log.info(f"training done in {format_seconds(time.perf_counter() - t_start)}: val top-1 "
                 f"{record['val']['top1']:.2f}%" + (f", EMA {record['val_ema']['top1']:.2f}%" if run.ema else "")
                 + f" (chance {chance:.1f}%); best {best['top1']:.2f}% at epoch {best['epoch']} ({BEST_NAME}); "
                 f"checkpoint {ckpt.path}")
        log.event({"event": "done", "epoch": run.epochs, "iteration": iteration, "val": record["val"],
                   "chance_top1": chance, "best": best, "time_s": round(time.perf_counter() - t_start, 3)})
        return EXIT_OK
    except Stop as s:
        return s.code
    finally:
        end_workers(loader, val_loader)
        log.close()


# ---------------------------------------------------------------------------------------------------------- parts
@dataclass
class Run:
    """What training is made of: the model (and its DDP wrapper), EMA, optimizer, schedule, mixup and the step."""
    model: Classifier
    model_ddp: nn.Module
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: SupervisedStep
    lr: float
    epochs: int  # including cooldown


def resolve_lr(cfg: SupervisedConfig, world: int) -> float:
    """``--lr`` as given, else timm's rule: ``lr_base x (global batch / lr_base_size)`` (square root of the ratio for
    Ada*/Lamb optimizers, or as ``--lr-base-scale`` says)."""
    if cfg.lr is not None:
        return float(cfg.lr)
    ratio = cfg.batch_size * world / cfg.lr_base_size
    scale = cfg.lr_base_scale or ("sqrt" if any(o in cfg.opt.lower() for o in ("ada", "lamb")) else "linear")
    return float(cfg.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio))


def build_run(cfg: SupervisedConfig, num_classes: int, niter: int, world: int, device: torch.device) -> Run:
    """Model (same initial weights on every rank: seed first), EMA before DDP as timm, optimizer and schedule from
    timm's factories."""
    if cfg.opt.lower() not in list_optimizers() and cfg.opt.lower().split("_")[-1] not in list_optimizers():
        raise ValueError(f"--opt {cfg.opt!r} is not a timm optimizer; e.g. sgd, adamw, lamb, lars "
                         f"(timm.optim.list_optimizers())")
    model = build_classifier(cfg.backbone_kwargs(), num_classes, cfg.drop)
    if cfg.split_bn:  # in place: the Classifier itself is no BatchNorm
        model = convert_splitbn_model(model, cfg.aug_splits)
    model = model.to(device)
    lr = resolve_lr(cfg, world)
    kw: dict[str, Any] = {}
    if cfg.opt_eps is not None:
        kw["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        kw["betas"] = tuple(cfg.opt_betas)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                    **kw)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    model_ddp: nn.Module = model
    if world > 1:
        model_ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    scheduler, epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
        decay_milestones=cfg.decay_milestones, cooldown_epochs=cfg.cooldown_epochs, decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, warmup_prefix=cfg.warmup_prefix,
        step_on_epochs=not cfg.sched_on_updates, updates_per_epoch=niter)
    step = SupervisedStep(model, model_ddp, build_loss(cfg).to(device), optimizer,
                          StepSettings(cfg.precision, cfg.clip_grad, cfg.clip_mode), device,
                          mixup=build_mixup(cfg, num_classes), ema=ema)
    return Run(model, model_ddp, ema, optimizer, scheduler, step, lr, int(epochs))


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def run_epoch(run: Run, loader, cfg: SupervisedConfig, epoch: int, iter0: int, niter: int, stop: PreemptionFlag,
              hooks: Hooks, state: "TrainState", log: Logger) -> tuple[torch.Tensor, int, int | None]:
    """One epoch from batch ``iter0``; returns the loss sums [sum, count], the global iteration reached and a stop
    code (or None). A stop mid-epoch saves the resume point here and raises ``Stop``."""
    step, device = run.step, run.step.device
    rank, main = D.get_rank(), D.is_main_process()
    run.model_ddp.train()
    if step.mixup is not None:
        step.mixup.mixup_enabled = not (cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch)
    if run.scheduler is not None:
        run.scheduler.step(epoch)  # per-epoch schedules (a no-op for --sched-on-updates)
    progress = Progress(niter, epoch, run.epochs, start=iter0, every=cfg.log_interval, enabled=main)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    stop_flag = torch.zeros(1, device=device)
    iteration = epoch * niter + iter0
    try:
        for i, (images, targets) in enumerate(loader, start=iter0):
            it = epoch * niter + i
            seed_step(cfg.seed, rank, it)
            if run.scheduler is not None:
                run.scheduler.step_update(num_updates=it)  # per-iteration schedules
            images = ([im.to(device, non_blocking=True) for im in images] if isinstance(images, (list, tuple))
                      else images.to(device, non_blocking=True))
            targets = targets.to(device, non_blocking=True)
            if hooks.before_step is not None:
                hooks.before_step(it)
            stats = step(images, targets, it + 1, poison_loss=hooks.poison_loss is not None and hooks.poison_loss(it))
            sums += torch.stack([stats[0].double(), torch.ones((), dtype=torch.float64, device=device)])
            stop_flag.fill_(float(stop.set))
            # the iteration's one host read: [non-finite on some rank, a stop signal on some rank]
            nonfinite, stop_requested = (v > 0 for v in agree(torch.cat([stats[1:], stop_flag])).tolist())
            if nonfinite:
                progress.close()
                if main:
                    print(nonfinite_message(float(stats[0]), rank, epoch, i, niter, it, current_lr(run.optimizer),
                                            cfg, state.ckpt.path), file=sys.stderr, flush=True)
                log.event({"event": "nonfinite_loss", "epoch": epoch, "iteration": it, "iter_in_epoch": i,
                           "loss": float(stats[0])})
                raise Stop(EXIT_NONFINITE)
            iteration = it + 1
            if main and ((i + 1) % cfg.log_interval == 0 or i + 1 == niter):
                loss, lr = float(stats[0]), current_lr(run.optimizer)
                progress.update(1, loss=loss, lr=lr)
                log.scalars("train", {"loss": loss, "lr": lr}, iteration)
            else:
                progress.update(1)
            max_reached = cfg.max_iters is not None and iteration >= cfg.max_iters
            if stop_requested or max_reached:
                code = EXIT_PREEMPTED if stop_requested else EXIT_OK
                if i + 1 < niter:  # mid-epoch: save here; the resumed run continues at this iteration
                    progress.close()
                    state.save(epoch, i + 1, iteration)
                    log_stop(log, code, epoch, iteration, i + 1, state.ckpt.path, stop.name, cfg.max_iters, niter,
                             "--max-iters")
                    raise Stop(code)
                return sums, iteration, code
        return sums, iteration, None
    finally:
        progress.close()


def end_epoch(run: Run, val_loader, cfg: SupervisedConfig, epoch: int, iteration: int, sums: torch.Tensor,
              world: int, device: torch.device, state: "TrainState", elapsed: float) -> dict[str, Any]:
    """BatchNorm statistics over ranks, validation (and of the EMA), the best checkpoint, the resume point; the
    epoch's record."""
    if world > 1 and cfg.dist_bn:
        distribute_bn(run.model, world, cfg.dist_bn == "reduce")
        if run.ema is not None:
            distribute_bn(run.ema.module, world, cfg.dist_bn == "reduce")
    t_val = time.perf_counter()
    val = validate(run.model, val_loader, device, run.step.autocast)
    val_ema = validate(run.ema.module, val_loader, device, run.step.autocast) if run.ema is not None else None
    D.all_reduce_mean(sums)  # [mean loss sum, mean count] over ranks
    record = {"epoch": epoch, "iteration": iteration, "train_loss": float(sums[0] / sums[1].clamp(min=1)),
              "lr": current_lr(run.optimizer), "val": val, "epoch_time_s": round(elapsed, 3),
              "val_time_s": round(time.perf_counter() - t_val, 3),
              "images_per_s": round(float(sums[1]) * world * cfg.batch_size / max(elapsed, 1e-9), 2)}
    if val_ema is not None:
        record["val_ema"] = val_ema
    metric = (val_ema or val)["top1"]
    improved = state.best["top1"] is None or metric > state.best["top1"]
    if improved:
        state.best = {"top1": metric, "epoch": epoch, "network": "model_ema" if val_ema is not None else "model"}
    record["best"] = dict(state.best)
    state.metrics = {"epoch": epoch, "val": val, "val_ema": val_ema}
    state.save(epoch + 1, 0, iteration, finished_epoch=epoch, also=BEST_NAME if improved else None)
    return record


def log_epoch(log: Logger, record: dict[str, Any], epochs: int, total_s: float) -> None:
    log.event(record)
    epoch = record["epoch"]
    log.scalars("epoch", {"train_loss": record["train_loss"], "lr": record["lr"],
                          "images_per_s": record["images_per_s"]}, epoch)
    log.scalars("val", record["val"], epoch)
    ema = record.get("val_ema")
    if ema:
        log.scalars("val_ema", ema, epoch)
    ema_txt = f" | EMA top-1 {ema['top1']:.2f} top-5 {ema['top5']:.2f}" if ema else ""
    v = record["val"]
    log.info(f"epoch {epoch}/{epochs} done: train loss {record['train_loss']:.4f} lr {record['lr']:.3g} | val top-1 "
             f"{v['top1']:.2f} top-5 {v['top5']:.2f} loss {v['loss']:.4f}{ema_txt} | "
             f"{record['images_per_s']:.1f} img/s, {format_seconds(record['epoch_time_s'])} | total "
             f"{format_seconds(total_s)}")
    log.tb.flush()


def nonfinite_message(loss: float, rank: int, epoch: int, i: int, niter: int, it: int, lr: float,
                      cfg: SupervisedConfig, ckpt_path: Path) -> str:
    return (f"stopping: non-finite loss ({loss:.4g} on rank {rank}; some rank saw a non-finite value) at epoch {epoch}, "
            f"iteration {i}/{niter} of the epoch, global step {it} (lr {lr:.3g}, precision {cfg.precision}). Nothing "
            f"was saved: {ckpt_path if ckpt_path.exists() else 'no checkpoint yet'} is the last good state. Usual "
            f"fixes: --precision bf16 instead of fp16, --clip-grad 1.0, a lower --lr, or more --warmup-epochs.")


AUX = "_aux_bn"


def split_aux_bn(name: str, sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{name: the usual keys, name + "_aux_bn": the split BatchNorms' extra statistics}`` (the latter only with
    ``--split-bn``): the evaluators read ``name`` as a plain model's state dict (the main BN statistics keep their
    keys); resume merges both back."""
    aux = {k: v for k, v in sd.items() if ".aux_bn." in k}
    out = {name: {k: v for k, v in sd.items() if k not in aux}}
    if aux:
        out[name + AUX] = aux
    return out


class TrainState:
    """What a checkpoint holds (plain data only, read with ``weights_only=True``), and how a run resumes from it."""

    def __init__(self, run: Run, config: dict[str, Any], ckpt: Checkpointer):
        self.run, self.config, self.ckpt = run, config, ckpt
        self.best: dict[str, Any] = {"top1": None, "epoch": None, "network": None}
        self.metrics: dict[str, Any] | None = None  # the last validation: {"epoch", "val", "val_ema"}

    def save(self, next_epoch: int, iter_in_epoch: int, iteration: int, finished_epoch: int | None = None,
             also: str | None = None) -> None:
        """Every rank calls this (the RNG states are gathered); rank 0 writes ``also`` (the best checkpoint) first,
        then the resume point."""
        rng = gather_rng_state()
        state = None
        if D.is_main_process():
            run = self.run
            scaler = run.step.scaler
            state = {**split_aux_bn("model", run.model.state_dict()), "optimizer": run.optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None, "epoch": int(next_epoch),
                     "iteration": int(iteration), "iter_in_epoch": int(iter_in_epoch), "config": self.config,
                     "best": dict(self.best), "metrics": self.metrics, "rng": rng}
            if run.ema is not None:
                state.update(split_aux_bn("model_ema", run.ema.module.state_dict()))
            if also is not None:
                save_atomic(state, self.ckpt.folder / also)
        self.ckpt.save(state, finished_epoch)

    def resume(self, ck: dict, niter: int, rank: int, world: int, log: Logger) -> tuple[int, int, int]:
        """Load ``ck``; returns (epoch, iteration in epoch, global iteration). A checkpoint of a run with other
        result-changing options, or another model, stops with the list of differences."""
        path, cfg_file = self.ckpt.path, self.ckpt.folder / "config.yaml"
        hint = f"resume with the options of that run (see {cfg_file}) or use another --output"
        stored = ck.get("config") or {}
        changed = [f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in self.config.items()
                   if k not in RUN_ONLY and k in stored and stored[k] != v and k != "world_size"]
        if changed:
            raise CheckpointError(f"{path} was written by a run with other options: {'; '.join(changed)}; {hint}")
        nets = [("model", self.run.model)] + ([("model_ema", self.run.ema.module)] if self.run.ema else [])
        for name, net in nets:
            if name not in ck:
                raise CheckpointError(f"{path} has no {name!r} (written without --model-ema?); {hint}")
            sd = {**ck[name], **(ck.get(f"{name}{AUX}") or {})}
            mismatch = describe_key_mismatch(net.state_dict(), sd)
            if mismatch:
                raise CheckpointError(f"{path} does not match the {name} built from these options:\n{mismatch}\n  {hint}")
            net.load_state_dict(sd)
        try:
            self.run.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimizer state does not match --opt {self.config['opt']} ({e}); "
                                  f"{hint}") from None
        if self.run.step.scaler is not None and ck.get("scaler"):
            self.run.step.scaler.load_state_dict(ck["scaler"])
        self.best = dict(ck.get("best") or self.best)
        self.metrics = ck.get("metrics")
        return restore_position(ck, path, niter, world, rank, log, "--output")
