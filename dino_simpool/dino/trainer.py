"""The DINO training loop: build, resume, loop over epochs, save (``train(cfg) -> exit code``).

Reads like DINO's ``train_dino``; the parts have homes of their own: ``build.py`` (student, teacher, placement),
``step.py`` (one iteration: forward, loss, backward, clip, step, EMA), ``dino_simpool.checkpoint.Checkpointer``
(resume point and snapshots), ``summary.py`` (the epoch's record and log lines), ``dino_simpool.data.loader``
(workers that can always be ended).

* Schedules are per iteration (lr warm-up + cosine, cosine wd, cosine teacher momentum); the teacher temperature is
  per epoch (inside ``DINOLoss``).
* Resume: rerunning the same command continues from ``output_dir/checkpoint.pth``, at an epoch boundary or at the
  iteration where SIGUSR1/SIGTERM stopped it. Every random draw is a function of the seed and the position in
  training (``dino_simpool.dino.determinism``), so on CPU the resumed run ends bit-identical to an uninterrupted one.
  A resume whose result-changing flags differ from the stored run's stops with the list of differences.
* Exit codes (``dino_simpool.signals``): 0 done, 75 saved after SIGUSR1/SIGTERM, 3 non-finite loss.
* Faults for tests come in through ``Hooks`` (tests/train_hooks.py); a normal run passes none.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dino_simpool import distributed as D
from dino_simpool.config import TrainConfig, result_differences
from dino_simpool.checkpoint import Checkpointer, CheckpointError, describe_key_mismatch
from dino_simpool.data import DataError, build_dataset
from dino_simpool.data.loader import end_workers, make_loader
from dino_simpool.augment import build_multicrop
from dino_simpool.dino.augment import eval_transform
from dino_simpool.dino.build import build_student_teacher, init_from_pretrained, optimizer_options, place, unwrap
from dino_simpool.data.sampling import ResumableDistributedSampler, SeededDataset
from dino_simpool.dino.determinism import gather_rng_state, restore_position, rng_isolated, seed_all, seed_step
from dino_simpool.dino.loss import DINOLoss
from dino_simpool.dino.optim import apply_schedules, build_optimizer, param_groups
from dino_simpool.dino.schedules import cosine_scheduler, scaled_lr
from dino_simpool.dino.step import DINOStep, StepSettings, agree
from dino_simpool.dino.summary import EpochSums, log_epoch, nonfinite_message
from dino_simpool.evaluation.knn import knn_accuracy
from dino_simpool.job import run_job
from dino_simpool.logs import Logger, Progress, format_seconds, log_stop
from dino_simpool.signals import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, PreemptionFlag, any_rank

CHECKPOINT_KEYS = ("student", "teacher", "optimizer", "dino_loss", "epoch", "iteration", "iter_in_epoch", "config")


@dataclass
class Hooks:
    """Callbacks into the loop. ``on_epoch_end(record)``: main process, after each epoch. The others inject faults
    for tests: ``before_step(it)`` runs before global iteration ``it`` on every rank, ``poison_loss(it)`` makes that
    iteration's loss NaN, ``on_train_end(teacher, rank)`` sees each rank's final teacher."""
    on_epoch_end: Callable[[dict], None] | None = None
    before_step: Callable[[int], None] | None = None
    poison_loss: Callable[[int], bool] | None = None
    on_train_end: Callable[[nn.Module, int], None] | None = None


class Stop(Exception):
    def __init__(self, code: int):
        self.code = code


def train(cfg: TrainConfig, on_epoch_end: Callable[[dict], None] | None = None, hooks: Hooks | None = None,
          stop: PreemptionFlag | None = None) -> int:
    """Run (or resume) DINO pretraining as configured; returns the process exit code (``dino_simpool.job``: lock,
    process group, watchdog, stop handlers)."""
    hooks = hooks or Hooks(on_epoch_end=on_epoch_end)
    cfg.resolve("cuda" if torch.cuda.is_available() else "cpu")
    return run_job(cfg.output_dir, cfg.backend, cfg.dist_url, lambda env, flag: _train(cfg, env, hooks, flag), stop)


def _train(cfg: TrainConfig, env: D.DistEnv, hooks: Hooks, stop: PreemptionFlag) -> int:
    device = D.device_for(env)
    rank, world = D.get_rank(), D.get_world_size()
    main = rank == 0
    out = Path(cfg.output_dir)
    log = Logger(out, main=main)
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.data_path is None:
        log.info("no --data_path: training on the embedded SyntheticShapes dataset; flags not given take its small "
                 "defaults (the demo's configuration, [embedded: ...] in --help; resolved values in config.yaml)")
    train_set, sampler, loader, knn_sets, aug = build_data(cfg, world, rank, device)
    niter = sampler.batches_per_epoch
    try:
        seed_all(cfg.seed)  # the same initial weights on every rank
        student, teacher = build_student_teacher(cfg)
        ckpt = Checkpointer(out, main, cfg.saveckp_freq)
        ckpt.prepare()
        resume_from = ckpt.load(CHECKPOINT_KEYS)
        if cfg.pretrained_weights and resume_from is None:  # a resume brings its own weights
            report = init_from_pretrained(student, teacher, cfg.pretrained_weights, cfg.checkpoint_key)
            log.info(f"backbone initialised from {cfg.pretrained_weights} ({report.get('format')}, "
                     f"key {report.get('checkpoint_key')}, {report.get('loaded')} tensors)")
        student, teacher, student_fwd, sync_buffers = place(student, teacher, device, compile=cfg.compile)
        optimizer = build_optimizer(cfg.optimizer, param_groups(student), **optimizer_options(cfg.optimizer, device))
        dino_loss = DINOLoss(cfg.out_dim, cfg.ncrops, cfg.warmup_teacher_temp, cfg.teacher_temp,
                             cfg.warmup_teacher_temp_epochs, cfg.epochs).to(device)
        step = DINOStep(student, student_fwd, teacher, dino_loss, optimizer,
                        StepSettings(cfg.precision, cfg.clip_grad, cfg.clip_grad_mode, cfg.freeze_last_layer),
                        device, sync_teacher_buffers=sync_buffers)
        sched = Schedules(cfg, niter, world)
        config_dict = {**cfg.to_dict(), "backbone": {**student.backbone.config, "drop_path_rate": 0.0},
                       "world_size": world, "iterations_per_epoch": niter}  # the teacher's backbone config
        state = TrainState(student, teacher, optimizer, step, dino_loss, config_dict, ckpt)
        if main:
            cfg.save_yaml(out / "config.yaml")
        fresh = resume_from is None
        epoch0, iter0, iteration = (0, 0, 0) if fresh else state.resume(resume_from, niter, rank, world, log)
        del resume_from  # the checkpoint's tensors are in the models now: free the copy
        if fresh:
            log.event({"event": "start", "config": config_dict})
        if cfg.max_iters == 0 and fresh:  # the step-0 weights: the "before" of a comparison
            state.save(0, 0, 0)
            log.info(f"--max_iters 0: saved the initial weights (seed {cfg.seed}) to {ckpt.path}")
            log.event({"event": "max_iters", "epoch": 0, "iteration": 0, "iter_in_epoch": 0})
            return EXIT_OK
        if epoch0 >= cfg.epochs or (cfg.max_iters is not None and iteration >= cfg.max_iters):
            log.info(f"nothing to do: the checkpoint is at epoch {epoch0}/{cfg.epochs}, iteration {iteration}")
            return EXIT_OK
        nparams = sum(p.numel() for p in student.parameters())
        log.info(f"dino-simpool: {cfg.arch} pooling={cfg.pooling} gamma={config_dict['backbone'].get('gamma')} "
                 f"drop_path={cfg.drop_path_rate:g} params={nparams / 1e6:.2f}M | {len(train_set)} images, {niter} "
                 f"it/epoch x {cfg.epochs} epochs, batch {cfg.batch_size_per_gpu}x{world} | {cfg.precision} on "
                 f"{device} | out {out}")
        for epoch in range(epoch0, cfg.epochs):
            t_epoch = time.perf_counter()
            sampler.set_epoch(epoch, iter0)
            sums, iteration, stop_code = run_epoch(step, loader, aug.to_device, sched, cfg, epoch, iter0, niter, stop,
                                                   hooks, state, log)
            iter0 = 0
            state.save(epoch + 1, 0, iteration, finished_epoch=epoch)
            if stop_code is None and any_rank([stop.set], device)[0]:  # a signal after the epoch's last step
                stop_code = EXIT_PREEMPTED
            record = sums.record(epoch, iteration, sched, dino_loss, time.perf_counter() - t_epoch,
                                 cfg.batch_size_per_gpu * world)
            if stop_code is None and knn_sets is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs - 1):
                t_knn = time.perf_counter()
                with rng_isolated():  # evaluation must not change the training's random stream
                    record["k-NN"] = knn_eval(teacher, cfg, knn_sets, device, log.info)
                record["knn_time_s"] = round(time.perf_counter() - t_knn, 3)
            log_epoch(log, record, cfg.epochs, time.perf_counter() - t_start)
            if hooks.on_epoch_end is not None and main:
                hooks.on_epoch_end(record)
            if stop_code is not None:
                log_stop(log, stop_code, epoch + 1, iteration, 0, ckpt.path, stop.name, cfg.max_iters)
                return stop_code
        if hooks.on_train_end is not None:
            hooks.on_train_end(unwrap(teacher), rank)
        log.event({"event": "done", "epoch": cfg.epochs, "iteration": iteration,
                   "time_s": round(time.perf_counter() - t_start, 3)})
        log.info(f"training done in {format_seconds(time.perf_counter() - t_start)}; checkpoint {ckpt.path}")
        return EXIT_OK
    except Stop as s:
        return s.code
    finally:
        end_workers(loader, *(knn_sets or ()))
        log.close()


def run_epoch(step: DINOStep, loader, to_device: Callable, sched: "Schedules", cfg: TrainConfig, epoch: int,
              iter0: int, niter: int, stop: PreemptionFlag, hooks: Hooks, state: "TrainState", log: Logger
              ) -> tuple[EpochSums, int, int | None]:
    """One epoch from batch ``iter0``; returns the epoch's sums, the global iteration reached and a stop code (or
    None). A stop mid-epoch saves the resume point here and raises ``Stop``; one at the epoch's end returns it."""
    device = step.device
    rank, main = D.get_rank(), D.is_main_process()
    step.train_mode()
    progress = Progress(niter, epoch, cfg.epochs, start=iter0, every=cfg.log_every, enabled=main)
    sums = EpochSums(device)
    stop_flag = torch.zeros(1, device=device)
    iteration = epoch * niter + iter0
    try:
        for i, (images, _labels) in enumerate(loader, start=iter0):
            it = epoch * niter + i
            seed_step(cfg.seed, rank, it)
            apply_schedules(step.optimizer, float(sched.lr[it]), float(sched.wd[it]))
            images = to_device(images, device)  # stage 2 of the multi-crop for the device pipelines
            if hooks.before_step is not None:
                hooks.before_step(it)
            stats = step(images, epoch, float(sched.momentum[it]),
                         poison_loss=hooks.poison_loss is not None and hooks.poison_loss(it))
            sums.add(stats)
            stop_flag.fill_(float(stop.set))
            # the iteration's one host read: [non-finite on some rank, a stop signal on some rank]
            nonfinite, stop_requested = (v > 0 for v in agree(torch.cat([stats[3:], stop_flag])).tolist())
            if nonfinite:
                progress.close()
                if main:
                    print(nonfinite_message(stats, rank, epoch, i, niter, it, sched, cfg, state.ckpt.path),
                          file=sys.stderr, flush=True)
                log.event({"event": "nonfinite_loss", "epoch": epoch, "iteration": it, "iter_in_epoch": i,
                           "loss": float(stats[0])})
                raise Stop(EXIT_NONFINITE)
            iteration = it + 1
            if main and ((i + 1) % cfg.log_every == 0 or iteration % cfg.log_every == 0 or i + 1 == niter):
                sums.log_step(log, progress, sched, it, cfg.log_every)
            else:
                progress.update(1)
            max_reached = cfg.max_iters is not None and iteration >= cfg.max_iters
            if stop_requested or max_reached:
                code = EXIT_PREEMPTED if stop_requested else EXIT_OK
                if i + 1 < niter:  # mid-epoch: save here; the resumed run continues at this iteration
                    progress.close()
                    state.save(epoch, i + 1, iteration)
                    log_stop(log, code, epoch, iteration, i + 1, state.ckpt.path, stop.name, cfg.max_iters, niter)
                    raise Stop(code)
                return sums, iteration, code
        return sums, iteration, None
    finally:
        progress.close()


# ---------------------------------------------------------------------------------------------------- parts
def build_data(cfg: TrainConfig, world: int, rank: int, device: torch.device):
    """Training set, its resumable sampler and loader, the periodic k-NN's (train, val) sets or None, and the
    multi-crop pipeline (its ``to_device`` runs stage 2 on the device); errors before any work."""
    aug = build_multicrop(cfg.global_crops_scale, cfg.local_crops_scale, cfg.local_crops_number,
                          global_size=cfg.global_crops_size, local_size=cfg.local_crops_size,
                          pipeline=cfg.aug_pipeline, device=device, backend=cfg.aug_backend)
    data_kw = dict(subset=cfg.subset, image_size=cfg.synthetic_size, images_per_class=cfg.synthetic_per_class)
    train_set = aug.prepare_dataset(build_dataset(cfg.data_path, "train", transform=aug.transform, **data_kw))
    sampler = ResumableDistributedSampler(len(train_set), num_replicas=world, rank=rank, seed=cfg.seed,
                                          shuffle=True, batch_size=cfg.batch_size_per_gpu, drop_last=True)
    if sampler.batches_per_epoch < 1:
        raise DataError(f"the training set has {len(train_set)} images: with {world} process(es) and "
                        f"--batch_size_per_gpu {cfg.batch_size_per_gpu} not one full batch per process; lower "
                        f"--batch_size_per_gpu or use more data")
    loader = make_loader(SeededDataset(train_set, cfg.seed), cfg.batch_size_per_gpu, cfg.num_workers,
                         sampler=sampler, drop_last=True, pin_memory=device.type == "cuda",
                         nice=cfg.loader_nice or 0, seed=cfg.seed, collate_fn=aug.collate_fn)
    knn_sets = None
    if cfg.eval_every > 0:
        etf = eval_transform(resize=int(round(cfg.global_crops_size * 256 / 224)), crop=cfg.global_crops_size)
        try:
            val_set = build_dataset(cfg.data_path, "val", transform=etf, image_size=cfg.synthetic_size)
        except DataError as e:
            raise DataError(f"{e} (the periodic k-NN needs the val split; pass --eval_every 0 to train without it)")
        knn_sets = (build_dataset(cfg.data_path, "train", transform=etf, **data_kw), val_set)
    return train_set, sampler, loader, knn_sets, aug


class Schedules:
    """DINO's per-iteration schedules: lr (linear warm-up, cosine; scaled by the global batch), wd, momentum."""

    def __init__(self, cfg: TrainConfig, niter: int, world: int):
        peak = scaled_lr(cfg.lr, cfg.batch_size_per_gpu * world)
        self.lr = cosine_scheduler(peak, cfg.min_lr, cfg.epochs, niter, warmup_epochs=cfg.warmup_epochs)
        self.wd = cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, niter)
        self.momentum = cosine_scheduler(cfg.momentum_teacher, 1.0, cfg.epochs, niter)


class TrainState:
    """What a checkpoint holds, and how a run is resumed from one (plain data only, see docs/reliability.md)."""

    def __init__(self, student, teacher, optimizer, step: DINOStep, loss: DINOLoss, config: dict,
                 ckpt: Checkpointer):
        self.student, self.teacher, self.optimizer, self.step, self.loss = student, teacher, optimizer, step, loss
        self.config, self.ckpt = config, ckpt

    def save(self, next_epoch: int, iter_in_epoch: int, iteration: int, finished_epoch: int | None = None) -> None:
        rng = gather_rng_state()
        state = None
        if D.is_main_process():
            scaler = self.step.scaler
            state = {"student": unwrap(self.student).state_dict(), "teacher": unwrap(self.teacher).state_dict(),
                     "optimizer": self.optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "dino_loss": {"center": self.loss.center.detach().cpu()}, "epoch": int(next_epoch),
                     "iteration": int(iteration), "iter_in_epoch": int(iter_in_epoch), "config": self.config,
                     "rng": rng}
        self.ckpt.save(state, finished_epoch)

    def resume(self, ck: dict, niter: int, rank: int, world: int, log: Logger) -> tuple[int, int, int]:
        """Load ``ck`` into the models, optimizer and loss; returns (epoch, iteration in epoch, global iteration)."""
        path, cfg_file = self.ckpt.path, self.ckpt.folder / "config.yaml"
        changed = result_differences(ck["config"], self.config)
        if changed and not self.config.get("resume_force"):
            raise CheckpointError(f"{path} does not match these flags: the run that wrote it differs in flags "
                                  f"that change the result:\n  "
                                  + "\n  ".join(changed) + f"\n  resume with that run's flags (see {cfg_file}), pass "
                                  f"--resume_force True to continue with the new ones, or use another --output_dir")
        if changed:
            log.info("resuming with changed flags (--resume_force): " + "; ".join(changed))
            log.event({"event": "resume_force", "changed": changed})
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            mismatch = describe_key_mismatch(unwrap(model).state_dict(), ck[name])
            if mismatch:
                raise CheckpointError(f"{path} does not match the {name} built from these flags:\n{mismatch}\n  "
                                      f"resume with the flags of that run (see {cfg_file}) or use another "
                                      f"--output_dir")
            unwrap(model).load_state_dict(ck[name])
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimizer state does not match --optimizer "
                                  f"{self.config['optimizer']} ({e}); resume with the flags of that run or use "
                                  f"another --output_dir") from None
        if self.step.scaler is not None and ck.get("scaler"):
            self.step.scaler.load_state_dict(ck["scaler"])
        self.loss.center.copy_(ck["dino_loss"]["center"].to(self.loss.center.device))
        return restore_position(ck, path, niter, world, rank, log)


def knn_eval(teacher: nn.Module, cfg: TrainConfig, datasets, device: torch.device,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """k-NN top-1/top-5 of the teacher backbone on val (train bank); every rank embeds and searches its shard
    (on ``device``), and every rank gets the numbers; ``log`` gets the search's FLOPs and ETA."""
    res = knn_accuracy(unwrap(teacher).backbone, *datasets, ks=tuple(cfg.nb_knn), T=cfg.temperature,
                       batch_size=max(cfg.batch_size_per_gpu, 64), num_workers=cfg.num_workers, device=device,
                       log=log)
    return {str(k): {"top1": float(v[0]), "top5": float(v[1])} for k, v in res.items()}
