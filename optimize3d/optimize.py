"""Image to 3D: a NeRF optimised by score distillation with the multi-view model, then exported.

    cfg = GenerateConfig.tiny()                               # or GenerateConfig.sd21() (the paper)
    result = generate(Path("photo.png"), Path("ckpt/step-000200"), Path("outputs/gen"), cfg)

Output: <out>/<image-stem>-<key>/ with config.yaml, cmd.txt, input.png (the RGBA the model saw, after
optimize3d/preprocess.py's segmentation and framing), multiview.png (that input on white + the 4 sampled
views; each view also in multiview/),
nerf/step-N/ (resumable), validation/step-N.png, mesh.glb, turntable.gif, generate.log, result.json.
The key hashes the image's bytes, the checkpoint, the segmenter file and every setting but `export`: the directory is
built as <name>.partial/ and renamed when complete. A rerun reuses a complete directory (and only
re-exports when `export` settings changed); after a crash it resumes from the last nerf/ checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from common.atomic import append_line, atomic_write_json, replace_dir
from common.config import config_hash, file_digest, save_config, stable_seed
from optimize3d.export import ExportConfig, extract_mesh, save_mesh, save_turntable, turntable_frames
from optimize3d.field import Field, FieldConfig
from optimize3d.guidance import GuidanceConfig, MultiViewGuidance, linear_ramp
from optimize3d.march import MarchConfig, new_occupancy_grid, update_grid
from optimize3d.preprocess import PreprocessConfig
from optimize3d.renderer import render_views
from optimize3d.rundir import run_dir_name, run_directory
from optimize3d.shading import draw_shading, light_positions
from render.cameras import DISTANCE, FOV_DEG, c2w_blender

SCHEMA_VERSION = 2          # 2: the input is preprocessed (segmentation, framing) and saved as input.png
# The renders' camera (distance 1.5, FOV ~49.1) as distance x tan(FOV / 2): the tiny model's training cameras.
TRAINING_RELATIVE_DISTANCE = DISTANCE * math.tan(math.radians(FOV_DEG) / 2)
log = logging.getLogger("generate")


@dataclass
class GenerateConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """What the model sees of the image: segmentation and framing (optimize3d/preprocess.py)."""
    nerf: FieldConfig = field(default_factory=FieldConfig)
    """The field: hash grid + MLPs (optimize3d/field.py)."""
    march: MarchConfig = field(default_factory=MarchConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    steps: int = 10_000
    views: int = 4
    """Views of one camera group: one elevation, FOV and distance; azimuths 360/views apart from a random offset."""
    view_groups: list[int] = field(default_factory=lambda: [2, 1])
    """Independent camera groups per step, per resolution phase (as `resolutions`): the released batch_size
    [8, 4] with n_view 4, i.e. 8 views per step until the first milestone, then 4."""
    elevation_range: list[float] = field(default_factory=lambda: [0.0, 30.0])
    elevation_sampling: str = "coin"
    """uniform (in degrees) | sphere (threestudio's inverse transform asin(2u - 1), u uniform over
    [(lo + 90) / 180, (hi + 90) / 180]: over [0, 30] it reaches only 19.47 deg) | coin (the released code: per
    step one coin, random() < 0.5 -> uniform, else sphere)."""
    fov_range: list[float] = field(default_factory=lambda: [15.0, 60.0])
    relative_distance_range: list[float] = field(default_factory=lambda: [0.8, 1.0])
    """Camera distance = this x 1 / tan(fov / 2): the object keeps its size in the image."""
    resolutions: list[int] = field(default_factory=lambda: [64, 256])
    resolution_milestones: list[int] = field(default_factory=lambda: [5000])
    """resolutions[i + 1] from step resolution_milestones[i] on."""
    shading_start: int = 5000
    """Albedo only before this step; then textureless / lambertian / albedo at random."""
    p_textureless: float = 0.5
    p_lambertian: float = 0.75
    light_distance_range: list[float] = field(default_factory=lambda: [0.8, 1.5])
    orientation_weight: list[float] = field(default_factory=lambda: [10.0, 1000.0])
    """[at step 0, from orientation_ramp_steps on], linear in between; [0, 0] turns the loss off."""
    orientation_ramp_steps: int = 5000
    lr_grid: float = 0.01
    lr_mlp: float = 0.001
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-15
    weight_decay: float = 0.01
    mixed_precision: str = "16-mixed"
    """16-mixed (the released: the whole step, field and renderer included, under fp16 autocast with a gradient
    scaler) | bf16 (the diffusion model alone under bf16 autocast) | auto (bf16 for the diffusion model on a GPU,
    else nothing) | no."""
    seed: int = 22
    """The released config's seed (the tiny preset: 0)."""
    deterministic: bool = False
    """torch's deterministic algorithms during the optimisation: a run killed and resumed then ends with
    exactly the weights of an uninterrupted one (on a CPU at no measurable cost; on a GPU the hash grid's
    3D grid_sample backward has no deterministic version, so results agree to float rounding there)."""
    val_every: int = 500
    ckpt_every: int = 1000
    log_every: int = 10
    preview_steps: int = 50
    """DDIM steps of multiview.png (the 2D model's 4 views from the CLIP embedding)."""
    preview_elevation: float = 30.0

    @staticmethod
    def sd21() -> "GenerateConfig":
        return GenerateConfig()

    @staticmethod
    def tiny() -> "GenerateConfig":
        """Minutes on a CPU with the tiny 32 px model: its training cameras (FOV 49.1 deg, distance 1.5),
        32 px renders, 64 samples per ray, the paper's schedules compressed to `steps`."""
        steps = 300
        return GenerateConfig(
            nerf=FieldConfig.tiny(), march=MarchConfig.tiny(),
            # CFG 2: the tiny model's samples of training objects measured best at 1-2 (PSNR 12-16 dB) and
            # oversaturated at 4 (6-13 dB) and 10 (3-8 dB); the paper's 10 stays the sd21 preset's.
            guidance=GuidanceConfig(t_anneal_steps=int(steps * 0.8), guidance_scale=2.0),
            export=ExportConfig(resolution=96, threshold=5.0, turntable_frames=24, turntable_size=96),
            steps=steps, view_groups=[1], elevation_sampling="uniform",
            fov_range=[FOV_DEG, FOV_DEG], relative_distance_range=[TRAINING_RELATIVE_DISTANCE] * 2,
            resolutions=[32], resolution_milestones=[], shading_start=steps // 2,
            orientation_ramp_steps=steps // 2, lr_grid=0.01, lr_mlp=0.001,
            val_every=100, ckpt_every=100, log_every=10, preview_steps=20, deterministic=True, seed=0,
            mixed_precision="auto")

    def validate(self) -> None:
        self.preprocess.validate()
        if len(self.resolutions) != len(self.resolution_milestones) + 1:
            raise ValueError(f"resolutions {self.resolutions} need one more entry than resolution_milestones "
                             f"{self.resolution_milestones}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision {self.mixed_precision!r}: expected one of {', '.join(MIXED_PRECISION)}")
        if self.steps < 1 or self.views < 1:
            raise ValueError(f"steps {self.steps} and views {self.views} must be at least 1")
        if len(self.view_groups) != len(self.resolutions) or min(self.view_groups) < 1:
            raise ValueError(f"view_groups {self.view_groups}: one count of at least 1 per entry of resolutions "
                             f"{self.resolutions}")
        if self.elevation_sampling not in ELEVATION_SAMPLING:
            raise ValueError(f"elevation_sampling {self.elevation_sampling!r}: expected one of {', '.join(ELEVATION_SAMPLING)}")

    def phase(self, step: int) -> int:
        return sum(step >= m for m in self.resolution_milestones)

    def resolution_at(self, step: int) -> int:
        return self.resolutions[self.phase(step)]

    def views_at(self, step: int) -> int:
        return self.views * self.view_groups[self.phase(step)]


ELEVATION_SAMPLING = ("uniform", "sphere", "coin")
MIXED_PRECISION = ("16-mixed", "bf16", "auto", "no")


@dataclass
class Precision:
    """How a step runs: `step` autocasts the whole step (render, guidance, losses) and `scaler` scales its loss
    (the released 16-mixed); `guidance` autocasts only the diffusion model."""
    step: Optional[torch.dtype]
    guidance: Optional[torch.dtype]
    scaler: torch.amp.GradScaler

    @staticmethod
    def of(setting: str, device: torch.device) -> "Precision":
        if setting == "16-mixed":
            return Precision(torch.float16, None, torch.amp.GradScaler(device.type))
        bf16 = setting == "bf16" or (setting == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
        return Precision(None, torch.bfloat16 if bf16 else None, torch.amp.GradScaler(device.type, enabled=False))


def draw_elevations(cfg: GenerateConfig, groups: int, rng: random.Random) -> list[float]:
    """One step's elevations in degrees, one per camera group, as `elevation_sampling` says (one coin per step)."""
    lo, hi = cfg.elevation_range
    if cfg.elevation_sampling == "sphere" or (cfg.elevation_sampling == "coin" and not rng.random() < 0.5):
        return [math.degrees(math.asin(2 * rng.uniform((lo + 90) / 180, (hi + 90) / 180) - 1)) for _ in range(groups)]
    return [rng.uniform(lo, hi) for _ in range(groups)]


def sample_cameras(cfg: GenerateConfig, rng: random.Random, step: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """One step's cameras: view_groups[phase] groups, each with its own elevation, FOV, distance and azimuth
    offset (the released random_multiview.py), its `views` views 360/views apart. -> c2w (Blender/OpenGL)
    [G * V, 4, 4], FOV [G * V] (degrees), azimuths [G * V], elevations [G]."""
    elevations = draw_elevations(cfg, cfg.view_groups[cfg.phase(step)], rng)
    c2w, fovs, azimuths = [], [], []
    for elevation in elevations:
        fov = rng.uniform(*cfg.fov_range)
        distance = rng.uniform(*cfg.relative_distance_range) / math.tan(math.radians(fov) / 2)
        offset = rng.uniform(0, 360)
        group = [(offset + k * 360.0 / cfg.views) % 360.0 for k in range(cfg.views)]
        c2w += [c2w_blender(az, elevation, distance) for az in group]
        fovs += [fov] * cfg.views
        azimuths += group
    return torch.tensor(np.stack(c2w), dtype=torch.float32), torch.tensor(fovs), azimuths, elevations


def to_image(x: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL."""
    return Image.fromarray((x.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------- checkpoints of the field
def save_nerf(root: Path, step: int, nerf: Field, grid, opt, scaler: Optional[torch.amp.GradScaler] = None) -> None:
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {f"field.{k}": v for k, v in nerf.state_dict().items()}
    state.update({f"grid.{k}": v for k, v in grid.state_dict().items()})
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / "field.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "grad_scaler": scaler.state_dict() if scaler else {}}))
    replace_dir(tmp, final)
    for old in root.glob("step-*"):          # the latest checkpoint is all a resume needs
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def latest_nerf(root: Path) -> Optional[Path]:
    from model.checkpoint import latest
    return latest(root)


def load_nerf(path: Path, nerf: Field, grid, opt=None, scaler: Optional[torch.amp.GradScaler] = None) -> int:
    state = load_file(str(path / "field.safetensors"))
    nerf.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("field.")})
    grid.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("grid.")})
    if opt is not None:
        opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    return state["step"]


# ---------------------------------------------------------------------------- the loop
def build_field(cfg: GenerateConfig, device: torch.device):
    torch.manual_seed(cfg.seed)
    nerf = Field(cfg.nerf).to(device)
    grid = new_occupancy_grid(cfg.nerf.radius, cfg.march).to(device)
    opt = torch.optim.AdamW([{"params": nerf.grid_parameters(), "lr": cfg.lr_grid},
                             {"params": nerf.mlp_parameters(), "lr": cfg.lr_mlp}],
                            betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return nerf, grid, opt


def sds_step(cfg: GenerateConfig, nerf: Field, grid, opt, guide: MultiViewGuidance, step: int,
             precision: Optional[Precision] = None) -> dict:
    """One optimisation step of the field (every draw a function of (seed, step)) -> its losses. precision:
    Precision.of(cfg.mixed_precision, device), the same object every step (its scaler keeps state)."""
    device = next(nerf.parameters()).device
    precision = precision or Precision.of("no", device)
    g = torch.Generator().manual_seed(stable_seed(cfg.seed, step))
    rng = random.Random(stable_seed(cfg.seed, step, "py"))
    update_grid(grid, nerf, step, cfg.nerf.radius, cfg.march, cfg.seed)
    c2w, fov, _, _ = sample_cameras(cfg, rng, step)
    c2w, fov = c2w.to(device), fov.to(device)
    mode = draw_shading(step, cfg.shading_start, cfg.p_textureless, cfg.p_lambertian, rng)
    ambient = rng.random()
    lights = light_positions(c2w[:, :3, 3], tuple(cfg.light_distance_range), g, cfg.views)
    w_orient = linear_ramp(step, cfg.orientation_weight[0], cfg.orientation_weight[1], cfg.orientation_ramp_steps)
    with torch.autocast(device.type, dtype=precision.step or torch.float32, enabled=precision.step is not None):
        out = render_views(nerf, grid, c2w, fov, cfg.resolution_at(step), cfg.march, mode=mode, lights=lights,
                           ambient=ambient, normals=w_orient > 0, stratified=True, generator=g)
        loss_sds = guide(out["rgb"], c2w, step, g, cfg.views)
        loss = loss_sds + (w_orient * out["orientation"] if w_orient > 0 else 0.0)
    opt.zero_grad(set_to_none=True)
    precision.scaler.scale(loss).backward()
    precision.scaler.step(opt)
    precision.scaler.update()
    return {"step": step + 1, "loss": float(loss.detach()), "sds": float(loss_sds.detach()),
            "orient": float(out.get("orientation", torch.zeros(())).detach()), "mode": mode, "samples": out["samples"]}


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch.use_deterministic_algorithms for the duration (warnings, not errors, for ops without a
    deterministic version), restored afterwards: the setting is per process."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def resolve_device(device: Optional[str]) -> torch.device:
    """The device asked for, else cuda when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def record_step(work: Path, logger: logging.Logger, parts: dict, every: int, total: int) -> None:
    """Every `every` steps and at the last: the step's losses to losses.jsonl and the log."""
    done = parts["step"]
    if done % every == 0 or done == total:
        append_line(work / "losses.jsonl", json.dumps(parts))
        logger.info("step %d %s", done, json.dumps(parts))


def optimize(cfg: GenerateConfig, model, embedding: torch.Tensor, work: Path, progress: bool = True) -> tuple:
    """Score-distil the field from `model` conditioned on `embedding`; resumes from work/nerf/."""
    with deterministic_algorithms(cfg.deterministic):
        return _optimize(cfg, model, embedding, work, progress)


def _optimize(cfg: GenerateConfig, model, embedding: torch.Tensor, work: Path, progress: bool) -> tuple:
    device = next(model.unet.parameters()).device
    nerf, grid, opt = build_field(cfg, device)
    precision = Precision.of(cfg.mixed_precision, device)
    start = 0
    if (ck := latest_nerf(work / "nerf")) is not None:
        start = load_nerf(ck, nerf, grid, opt, precision.scaler)
        log.info("resumed from %s (step %d)", ck, start)
    guide = MultiViewGuidance(model, embedding, cfg.guidance, autocast=precision.guidance)
    from tqdm import tqdm
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="3D", disable=not progress,
               dynamic_ncols=True)
    for step in bar:
        parts = sds_step(cfg, nerf, grid, opt, guide, step, precision)
        done = step + 1
        bar.set_postfix(sds=f"{parts['sds']:.3g}", orient=f"{parts['orient']:.3g}", mode=parts["mode"])
        record_step(work, log, parts, cfg.log_every, cfg.steps)
        if done % cfg.val_every == 0 or done == cfg.steps:
            save_validation(nerf, grid, cfg, work / "validation" / f"step-{done:06d}.png")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_nerf(work / "nerf", done, nerf, grid, opt, precision.scaler)
    return nerf, grid


@torch.no_grad()
def save_validation(nerf: Field, grid, cfg: GenerateConfig, path: Path) -> None:
    """4 views at the preview elevation: albedo (top), normals (bottom)."""
    from render.preview import grid as image_grid
    device = next(nerf.parameters()).device
    dist = cfg.relative_distance_range[0] / math.tan(math.radians(cfg.fov_range[0]) / 2)
    c2w = torch.tensor(np.stack([c2w_blender(az, cfg.preview_elevation, dist) for az in (0, 90, 180, 270)]),
                       dtype=torch.float32, device=device)
    size = cfg.resolutions[-1]
    out = render_views(nerf, grid, c2w, torch.full((4,), cfg.fov_range[0]), size, cfg.march, normals=True,
                       ray_chunk=1 << 14)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid([to_image(x) for x in out["rgb"]] + [to_image(x) for x in out["normal"]], columns=4).save(path)


# ---------------------------------------------------------------------------- one image, end to end
def preview_cameras(cfg: GenerateConfig) -> torch.Tensor:
    return torch.tensor(np.stack([c2w_blender(az, cfg.preview_elevation, 1.5) for az in (0.0, 90.0, 180.0, 270.0)]),
                        dtype=torch.float32)


def output_key(image_sha: str, checkpoint_id: str, cfg: GenerateConfig) -> str:
    settings = dataclasses.asdict(cfg)
    settings.pop("export")
    segmenter = settings["preprocess"]["segmenter"]           # the file's identity, not where it lies
    settings["preprocess"]["segmenter"] = file_digest(segmenter) if segmenter else ""
    return config_hash({"image": image_sha, "checkpoint": checkpoint_id, "settings": settings, "schema": SCHEMA_VERSION})


def export_outputs(nerf: Field, grid, cfg: GenerateConfig, work: Path) -> dict:
    mesh = extract_mesh(nerf, cfg.export)
    formats = {"glb", cfg.export.format}          # mesh.glb always (browsers, report.html), plus the one asked for
    for fmt in formats:
        save_mesh(mesh, work / f"mesh.{fmt}")
    for stale in work.glob("mesh.*"):              # a format asked for by an earlier export
        if stale.suffix.lstrip(".") not in formats:
            stale.unlink()
    frames = turntable_frames(nerf, grid, cfg.march, cfg.export)
    save_turntable(frames, work / f"turntable.{cfg.export.turntable_format}")
    info = {"vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)),
            "watertight": bool(mesh.is_watertight), "export_key": config_hash(cfg.export)}
    atomic_write_json(work / "export.json", info)
    return info


def generate(image: Path, checkpoint_dir: Path, out_root: Path, cfg: GenerateConfig, cmd: str = "",
             progress: bool = True, device: Optional[str] = None, model_overrides=()) -> dict:
    """One image -> <out_root>/<stem>-<key>/ (see the module docstring). Returns a summary dict.
    model_overrides: `key=value` ModelConfig fields over the checkpoint's own configuration."""
    from model import checkpoint
    from optimize3d.inputs import image_digest, load_input_image
    from optimize3d.preprocess import preprocess
    from common.atomic import atomic_path, atomic_write_text
    from render.preview import grid as image_grid, on_white

    cfg.validate()
    picture = load_input_image(image)
    image_sha = image_digest(image)
    checkpoint_dir = checkpoint.find(checkpoint_dir, "--checkpoint")
    model_cfg = checkpoint.model_config(checkpoint_dir, model_overrides)
    model_cfg.validate()
    checkpoint_id = checkpoint.identity(checkpoint_dir) + (config_hash(list(model_overrides)) if model_overrides else "")
    key = output_key(image_sha, checkpoint_id, cfg)
    final = Path(out_root) / run_dir_name(image, key)
    t0 = time.time()
    with run_directory(final, cfg.export, log, "generate.log") as work:
        if work is None:
            return {"image": str(image), "output": str(final), "status": "cached", "seconds": time.time() - t0}
        rgba, warnings = preprocess(picture, cfg.preprocess, str(image))
        for w in warnings:
            log.warning(w)
        with atomic_path(work / "input.png") as tmp:
            rgba.save(tmp, format="PNG")
        picture = on_white(rgba)
        dev = resolve_device(device)
        model = checkpoint.load_model(checkpoint_dir, model_cfg).to(dev)
        save_config(cfg, work / "config.yaml")
        if cmd:
            atomic_write_text(work / "cmd.txt", cmd + "\n")
        picture_sha = hashlib.sha256(repr(picture.size).encode() + picture.tobytes()).hexdigest()
        embedding = clip_embedding(picture, picture_sha, model.cfg, Path(out_root) / "cache" / "clip")
        if not (work / "multiview.png").is_file():
            g = torch.Generator().manual_seed(cfg.seed)
            views = model.sample_preview(embedding, preview_cameras(cfg), cfg.preview_steps, cfg.guidance.guidance_scale, g)
            (work / "multiview").mkdir(exist_ok=True)
            for i, v in enumerate(views):                 # azimuths 0, 90, 180, 270 (for evaluation)
                to_image((v + 1) / 2).save(work / "multiview" / f"{i:03d}.png")
            tmp = work / ".tmp-multiview.png"
            image_grid([picture.resize((views.shape[-1],) * 2)] + [to_image((v + 1) / 2) for v in views], columns=5).save(tmp)
            tmp.replace(work / "multiview.png")       # written last: marks the views complete
        if work == final:                             # only the export settings changed
            nerf, grid, _ = build_field(cfg, dev)
            load_nerf(latest_nerf(work / "nerf"), nerf, grid)
        else:
            nerf, grid = optimize(cfg, model, embedding, work, progress=progress)
        info = export_outputs(nerf, grid, cfg, work)
        log.info("exported %s", json.dumps(info))
    return {"image": str(image), "output": str(final), "status": "ok", "seconds": time.time() - t0,
            "warnings": warnings, **info}


def clip_embedding(picture: Image.Image, image_sha: str, model_cfg, cache: Path) -> torch.Tensor:
    """The picture's CLIP embedding, cached per (the picture's pixels, encoder identity and preprocessing)."""
    from common.atomic import atomic_write_bytes
    from model.encoder import ImageEncoder, encoder_identity
    from safetensors.torch import save as save_bytes
    path = cache / f"{image_sha[:16]}-{config_hash(encoder_identity(model_cfg.encoder, model_cfg.inference))}.safetensors"
    if path.is_file():
        return load_file(str(path))["embedding"]
    emb = ImageEncoder(model_cfg.encoder, model_cfg.inference).encode([picture])[0]
    atomic_write_bytes(path, save_bytes({"embedding": emb.contiguous()}))
    return emb
