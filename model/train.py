"""The fine-tuning loop of both stages, in-process or on Ray Train (TorchTrainer, DDP).

    cfg = TrainConfig.tiny(stage=1)
    train(cfg, data_dir, run_dir, num_workers=0)      # 0: this process; N: N Ray Train workers

Every random draw (data order, branch, noise, timesteps, condition dropout) is a function of
(seed, step, micro-step, rank), so a run resumed from a checkpoint continues exactly as if it had
never stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from common.config import from_dict, stable_seed
from dataset.prepared import PreparedIndex, PrepareConfig
from dataset.samples import BranchBatchSampler, MultiViewDataset, SampleConfig, collate
from dataset.views import RenderedObject
from model import checkpoint
from model.mvmodel import ModelConfig, MultiViewModel
from model.prepare import load_index, prepare
from render.layout import object_dir

log = logging.getLogger("finetune")
RAY_POINTER = "iso3d-checkpoint.json"
RAY_REPORT = ".ray-report"                 # rank 0's pointer folder in the run directory, while it reports


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SampleConfig = field(default_factory=SampleConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    loader_workers: int = 4
    """DataLoader worker processes per training worker, reading micro-batches from the prepared shards
    ahead of the step (0: in the training process)."""
    stage: int = 1
    batch_size: int = 4
    """Objects per micro-batch per worker (each object is 1 or 4 views)."""
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    """constant (stage 1) or linear decay to 0 at max_steps (stage 2)."""
    max_steps: int = 1000
    standardize_embeddings: bool = False
    """When the model has no embedding statistics yet (a first stage 1), compute the per-dimension mean and
    std of the training set's CLIP embeddings and condition on standardised embeddings from then on (saved
    in every checkpoint's config.json; see ModelConfig.embedding_mean). On in the tiny preset, whose
    random-weight encoder is nearly constant across objects; off at sd21 (real CLIP, the released model)."""
    cond_dropout: float = 0.1
    """Probability that an object's CLIP embedding is replaced by zeros (so CFG works)."""
    grad_clip: float = 1.0
    mixed_precision: str = "auto"
    """no | bf16 | auto (bf16 on a GPU that supports it, otherwise no)."""
    seed: int = 0
    val_percent: float = 5.0
    log_every: int = 10
    val_every: int = 500
    ckpt_every: int = 500
    keep_last: int = 3
    """Checkpoints kept: the keep_last newest (>= 1; the newest is what a resume needs)..."""
    keep_every: int = 0
    """...and every one whose step is a multiple of keep_every (0: none). Older ones are deleted after each
    save: at sd21 a checkpoint is about 10 GB, and a stage-1 run saves a hundred."""
    sample_steps: int = 50
    guidance: float = 10.0
    ema_decay: float = 0.0
    """Exponential moving average of the trained weights (diffusers' EMAModel, with its warm-up
    decay_t = min(ema_decay, 1 - (1 + t)^-ema_power)), kept by rank 0, saved as unet_ema/ in every
    checkpoint and used for the validation samples, generate and --init. 0: none."""
    ema_power: float = 0.6667

    @staticmethod
    def tiny(stage: int = 1) -> "TrainConfig":
        # Linear decay in both stages (the paper's stage 1 is constant): at 2e-3 a constant rate leaves the tiny
        # model wherever the last noisy steps put it; measured on the demo objects at 600 steps, decay gave
        # samples of 13.5-17.4 dB PSNR against their ground truth where constant gave 11.4-14.6.
        return TrainConfig(model=ModelConfig.tiny(), data=SampleConfig(image_size=32), stage=stage, batch_size=4,
                           lr=2e-3 if stage == 1 else 5e-4, lr_schedule="linear",
                           warmup_steps=10, max_steps=200 if stage == 1 else 100, val_every=100, ckpt_every=50,
                           sample_steps=20, guidance=2.0, val_percent=0.0, standardize_embeddings=True, loader_workers=0)

    @staticmethod
    def small(stage: int = 1) -> "TrainConfig":
        """sd21's training code paths (VAE latents, bf16 autocast, gradient checkpointing, accumulation with
        no_sync, constant-then-linear schedules) on ModelConfig.small(): seconds on a CPU."""
        return TrainConfig(model=ModelConfig.small(), data=SampleConfig(image_size=32), stage=stage, batch_size=2,
                           grad_accum=2, lr=1e-4 if stage == 1 else 1e-5, warmup_steps=2 if stage == 1 else 0,
                           lr_schedule="constant" if stage == 1 else "linear", max_steps=4 if stage == 1 else 2,
                           mixed_precision="bf16", val_percent=0.0, val_every=100, ckpt_every=2, sample_steps=4,
                           loader_workers=1)

    @staticmethod
    def sd21(stage: int = 1) -> "TrainConfig":
        """The paper: stage 1 constant lr after 10k warm-up steps, batch 768 (accumulation 4), 50k steps;
        stage 2 linear, batch 128, 5k steps. batch_size is per worker: set it to total / (workers * accum)."""
        prep = PrepareConfig(dtype="float16")
        if stage == 1:
            return TrainConfig(model=ModelConfig.sd21(), prepare=prep, stage=1, batch_size=24, grad_accum=4, lr=1e-4,
                               warmup_steps=10_000, lr_schedule="constant", max_steps=50_000, keep_every=10_000)
        return TrainConfig(model=ModelConfig.sd21(), prepare=prep, stage=2, batch_size=16, grad_accum=1, lr=1e-5,
                           warmup_steps=0, lr_schedule="linear", max_steps=5_000)

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage {self.stage}: expected 1 or 2")
        if self.data.image_size != self.model.image_size:
            raise ValueError(f"data.image_size {self.data.image_size} != model.image_size {self.model.image_size}")
        if self.mixed_precision not in ("no", "bf16", "auto"):
            raise ValueError(f"mixed_precision {self.mixed_precision!r}: expected no, bf16 or auto")
        from render.quality import FLAGS
        if set(self.data.exclude_flags) - set(FLAGS):
            raise ValueError(f"data.exclude_flags {sorted(set(self.data.exclude_flags) - set(FLAGS))}: unknown; "
                             f"the flags are {', '.join(FLAGS)}")
        if not 0 <= self.ema_decay < 1 or self.ema_power <= 0:
            raise ValueError(f"ema_decay {self.ema_decay} / ema_power {self.ema_power}: expected 0 <= ema_decay < 1 "
                             "(0: no moving average) and ema_power > 0")
        if self.keep_last < 1 or self.keep_every < 0:
            raise ValueError(f"keep_last {self.keep_last} / keep_every {self.keep_every}: expected keep_last >= 1 "
                             "(the newest checkpoint is what a resume needs) and keep_every >= 0")
        if self.loader_workers < 0:
            raise ValueError(f"loader_workers {self.loader_workers}: expected >= 0")
        lr_lambda(self.lr_schedule, 1, 1)(0)
        self.prepare.validate()
        self.model.validate()


def lr_lambda(schedule: str, warmup: int, total: int):
    """Linear warm-up, then constant (stage 1) or linear decay to 0 at `total` (stage 2)."""
    def f(step: int) -> float:
        w = min(1.0, (step + 1) / max(1, warmup))
        if schedule == "constant":
            return w
        if schedule == "linear":
            return w * max(0.0, 1 - step / max(1, total))
        raise ValueError(f"lr schedule {schedule!r}: expected constant or linear")
    return f


def embedding_statistics(objects) -> tuple[list[float], list[float]]:
    """Per-dimension mean and std over every reference view of the objects, accumulated in float64 one
    object at a time (memory does not grow with the dataset; every rank and a rerun get the same numbers)."""
    total = squares = None
    n = 0
    for o in objects:
        e = o.clip().double()
        total = e.sum(0) if total is None else total + e.sum(0)
        squares = (e * e).sum(0) if squares is None else squares + (e * e).sum(0)
        n += e.shape[0]
    mean = total / n
    return mean.tolist(), (squares / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6).tolist()


class Batches(torch.utils.data.Dataset):
    """Micro-batch m of this rank, for any m: the data order of a resumed run is the same. A Dataset over m,
    so that a DataLoader's workers build micro-batches ahead of the training step."""

    def __init__(self, ds: MultiViewDataset, cfg: TrainConfig, rank: int, world: int):
        self.ds = ds
        self.sampler = BranchBatchSampler(len(ds), cfg.batch_size, cfg.data.single_view_probability, cfg.seed,
                                          rank=rank, world_size=world)
        self.epoch, self.cache = -1, []

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, m: int) -> dict:
        return self.get(m)

    def get(self, m: int) -> dict:
        epoch, pos = divmod(m, len(self.sampler))
        if epoch != self.epoch:
            self.sampler.set_epoch(epoch)
            self.epoch, self.cache = epoch, list(self.sampler)
        return collate([self.ds[k] for k in self.cache[pos]])

    def loader(self, first: int, end: int, workers: int):
        """Micro-batches first..end-1 in order, built by `workers` processes (0: this one)."""
        return torch.utils.data.DataLoader(self, batch_size=None, sampler=range(first, end), num_workers=workers,
                                           prefetch_factor=4 if workers else None, pin_memory=torch.cuda.is_available())


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_worker(cfg_dict: dict, data_dir: str, run_dir: str, init: Optional[str], resume: Optional[str],
                 rank: int = 0, world: int = 1, ray_train: bool = False, progress: bool = True) -> dict:
    cfg = from_dict(TrainConfig, cfg_dict)
    run = Path(run_dir)
    if ray_train:
        import ray.train
        restored = ray.train.get_checkpoint()   # set when Ray Train restarted the workers after a failure
        if restored is not None:
            with restored.as_directory() as d:
                resume = json.loads((Path(d) / RAY_POINTER).read_text())["checkpoint"]
            log.info("rank %d: restarted by Ray Train, resuming from %s", rank, resume)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(cfg.seed)   # identical initial weights on every rank
    model = MultiViewModel(cfg.model)
    if init:
        checkpoint.load_model_weights(model, Path(init))
    model.to(device)
    index = load_index(cfg.model, Path(data_dir), cfg.prepare)    # prepared by train() beforehand
    objects = index.objects("train", cfg.val_percent, exclude=cfg.data.exclude_flags)
    if rank == 0:
        for uid, reason in index.broken.items():
            log.warning("left out: %s", reason)
        for uid, flags in index.flags.items():
            if set(flags) & set(cfg.data.exclude_flags):
                log.warning("left out: %s: flagged %s (data.exclude_flags)", uid, ", ".join(flags))
    ck = checkpoint.resolve(resume, run / "checkpoints") if resume else None
    weights_from = ck or (Path(init) if init else None)
    if weights_from is not None:
        saved = checkpoint.model_config(weights_from)   # the statistics its weights were trained with
        if saved.embedding_mean is not None:
            model.cfg.embedding_mean, model.cfg.embedding_std = saved.embedding_mean, saved.embedding_std
    if cfg.standardize_embeddings and model.cfg.embedding_mean is None:
        model.cfg.embedding_mean, model.cfg.embedding_std = embedding_statistics(objects)
        log.info("conditioning on standardised CLIP embeddings (statistics of %d objects)", len(objects))
    ds = MultiViewDataset(objects, cfg=cfg.data)
    shown = validation_objects(cfg, Path(data_dir), index) if rank == 0 else None
    params = [p for p in model.unet.parameters() if p.requires_grad]
    # fused: one kernel over all parameters (the per-tensor loop took 6.5% of a tiny step on 2 cores)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps))
    start = 0
    if resume:
        checkpoint.load_model_weights(model, ck, moving_average=False)
        start = checkpoint.load_training_state(ck, opt, sched)
    ema = None
    if rank == 0 and cfg.ema_decay > 0:
        from diffusers.training_utils import EMAModel
        ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=cfg.ema_power)
        if resume:
            checkpoint.load_ema(ck, model, ema)
    net = model
    if ray_train:
        import ray.train.torch
        net = ray.train.torch.prepare_model(model, move_to_device=False)
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda"
                                             and torch.cuda.is_bf16_supported())
    micro_batches = iter(Batches(ds, cfg, rank, world).loader(start * cfg.grad_accum, cfg.max_steps * cfg.grad_accum,
                                                                 cfg.loader_workers))
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run / "tensorboard"))
    from tqdm import tqdm
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc=f"stage {cfg.stage}",
               disable=rank != 0 or not progress, dynamic_ncols=True)
    history, saved = [], None
    for step in bar:
        started = time.perf_counter()
        net.train()
        total = 0.0
        for micro in range(cfg.grad_accum):
            m = step * cfg.grad_accum + micro
            g = torch.Generator().manual_seed(stable_seed(cfg.seed, m, rank))
            batch = _to(next(micro_batches), device)
            # DDP all-reduces at every backward unless told not to: once per optimizer step is enough.
            last = micro == cfg.grad_accum - 1
            with (net.no_sync() if not last and hasattr(net, "no_sync") else contextlib.nullcontext()):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = net(batch, cfg.stage, g, cfg.cond_dropout) / cfg.grad_accum
                loss.backward()
            total += loss.item()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))   # before clipping
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        history.append(total)
        done = step + 1
        if rank == 0:
            bar.set_postfix(loss=f"{total:.4f}")
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                writer.add_scalar("loss", total, done)
                writer.add_scalar("lr", sched.get_last_lr()[0], done)
                writer.add_scalar("grad_norm", grad_norm, done)
                writer.add_scalar("step_seconds", time.perf_counter() - started, done)
            if done % cfg.ckpt_every == 0 or done == cfg.max_steps:
                saved = checkpoint.save(run / "checkpoints", done, model, opt, sched, {"loss": total}, ema)
            if done % cfg.val_every == 0 or done == cfg.max_steps:
                with moving_average(ema, params):
                    sheet = validation_grid(model, cfg, shown, run / "validation" / f"step-{done:06d}.png")
                writer.add_image("validation", np.asarray(sheet.convert("RGB")), done, dataformats="HWC")
        if ray_train:
            report_to_ray({"loss": total, "step": done}, saved)
        if saved is not None:
            # After the report: until then, the checkpoint Ray Train restarts from is the previous one.
            checkpoint.prune(run / "checkpoints", cfg.keep_last, cfg.keep_every, protect=[ck] if ck else [])
            saved = None
    if writer is not None:
        writer.close()
    return {"losses": history, "start": start}


@contextlib.contextmanager
def moving_average(ema, params: list):
    """The moving average's weights in `params` for the block (none kept: the trained ones), then back."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def report_to_ray(metrics: dict, saved: Optional[Path]) -> None:
    """Every rank reports every step (Ray Train's collective); a step that saved a checkpoint reports, from
    rank 0, a Ray checkpoint holding only the path of ours: the weights are written once, in this project's
    format, on the run directory every node shares, and Ray hands the pointer back after a restart. Ray copies
    the pointer's folder before `report` returns; the folder is the run's own `.ray-report` (replaced each time),
    not a temporary one: a worker killed mid-report (a node failure) would leave a temporary folder in /tmp."""
    import shutil
    import ray.train
    if saved is None:
        ray.train.report(metrics)
        return
    folder = Path(saved).resolve().parents[1] / RAY_REPORT      # <run>/checkpoints/step-N -> <run>/.ray-report
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / RAY_POINTER).write_text(json.dumps({"checkpoint": str(Path(saved).resolve()), **metrics}))
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    shutil.rmtree(folder)


def validation_objects(cfg: TrainConfig, data_dir: Path, index: PreparedIndex) -> MultiViewDataset:
    """The objects the validation grid shows, from their renders (ground truth as images): the first
    training object and, when val_percent holds any out, the first held-out one."""
    exclude = cfg.data.exclude_flags
    shown = index.objects("train", cfg.val_percent, exclude)[:1] + index.objects("val", cfg.val_percent, exclude)[:1]
    return MultiViewDataset([RenderedObject.open(object_dir(data_dir, o.uid)) for o in shown], index, cfg.data)


@torch.no_grad()
def validation_grid(model: MultiViewModel, cfg: TrainConfig, shown: MultiViewDataset, path: Path) -> Image.Image:
    """Per object of `shown` (the first training object, then the first held-out one when the split has
    any), two rows: its 4 sampled views, then the ground truth at the same cameras. Saved at `path`, and returned."""
    from render.preview import grid
    model.eval()
    to_img = lambda x: Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())  # noqa: E731
    tiles = []
    for i in range(len(shown)):
        sample = shown[(i, "multi", cfg.seed)]
        g = torch.Generator().manual_seed(cfg.seed)
        views = model.sample(sample["clip_embedding"], sample["target_cameras"], cfg.sample_steps, cfg.guidance, g)
        tiles += [to_img(v) for v in views] + [to_img(v) for v in sample["target"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet = grid(tiles, columns=4)
    sheet.save(path)
    log.info("validation %s: %s", path.name, ", ".join(o.uid for o in shown.objects))
    return sheet


def _ray_loop(config: dict) -> None:
    import ray.train
    ctx = ray.train.get_context()
    train_worker(config["cfg"], config["data_dir"], config["run_dir"], config["init"], config["resume"],
                 rank=ctx.get_world_rank(), world=ctx.get_world_size(), ray_train=True, progress=False)


def worker_paths(data_dir: Path, run_dir: Optional[Path], model_cfg: ModelConfig, init: Optional[str]) -> dict:
    """Every path a Ray worker (training or prepare) opens, by the name the user knows it by."""
    paths = {"--data": Path(data_dir), **({"--output": Path(run_dir)} if run_dir is not None else {})}
    if init:
        paths["--init (as converted or given)"] = Path(init)
    if model_cfg.vae_path:
        paths["model.vae_path"] = Path(model_cfg.vae_path)
    if model_cfg.encoder.weights:
        paths["model.encoder.weights"] = Path(model_cfg.encoder.weights)
    return paths


def connect_ray(address: Optional[str], num_workers: int, data_dir: Path, run_dir: Optional[Path],
                shared_storage: bool = False, model_cfg: Optional[ModelConfig] = None, init: Optional[str] = None) -> None:
    """Join the cluster (or start a local Ray for num_workers) and check that every node of a cluster of
    several can open what its workers will: data_dir, run_dir (None: the prepare step alone), the --init
    checkpoint (a converted one lies in the node-local $ISO3D_CACHE unless that is shared) and the VAE and
    encoder weights; ValueError otherwise. Idempotent: the CLI calls it before it writes."""
    from common.ray_local import init_ray, require_shared_storage
    init_ray(address, num_cpus=None if address else max(num_workers, os.cpu_count() or 1))
    require_shared_storage(worker_paths(data_dir, run_dir, model_cfg or ModelConfig(), init), assume_shared=shared_storage)


def train(cfg: TrainConfig, data_dir: Path, run_dir: Path, init: Optional[str] = None, resume: Optional[str] = None,
          num_workers: int = 0, address: Optional[str] = None, use_gpu: bool = False, max_failures: int = 3,
          shared_storage: bool = False, prepare_data: bool = True) -> dict:
    """num_workers 0: train in this process. N >= 1: Ray Train with N DDP workers (gloo on CPU); when a worker
    dies, Ray Train restarts them all from the last checkpoint, up to max_failures times. On a cluster of
    several nodes, data_dir and run_dir must be on storage every node mounts (refused otherwise, unless
    shared_storage says they are). First the prepared data is brought up to date (dataset/prepared.py: new
    and re-rendered objects only, as Ray tasks when num_workers > 0); prepare_data=False trains on the
    index as it is, without listing the render root."""
    cfg.validate()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = dataclasses.asdict(cfg)
    if num_workers:
        connect_ray(address, num_workers, data_dir, run_dir, shared_storage, cfg.model, init)
    if prepare_data:
        stats = prepare(cfg.model, Path(data_dir), cfg.prepare, num_workers=num_workers, use_gpu=use_gpu).stats
        log.info("prepared data: %s", stats)
    if num_workers == 0:
        return train_worker(cfg_dict, str(data_dir), str(run_dir), init, resume)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={"cfg": cfg_dict, "data_dir": str(Path(data_dir).resolve()), "run_dir": str(run_dir.resolve()),
                           "init": init, "resume": resume},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name="ray", storage_path=str((run_dir / "ray").resolve()),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    return {"metrics": result.metrics}


