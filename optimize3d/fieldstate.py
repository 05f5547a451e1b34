"""Checkpoints of the field during the 3D stage: work/nerf/step-N/ (field.safetensors, optimizer.pt,
state.json with the gradient scaler), written atomically; only the latest is kept (all a resume needs)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from common.atomic import replace_dir
from optimize3d.field import Field


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
