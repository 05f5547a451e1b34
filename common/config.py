"""Typed configuration: a dataclass per component, loaded from YAML with dotted overrides.

    cfg = load_config(RenderConfig, "my.yaml", ["samples=64", "hdri.strength_range=[0.5,1.5]"])
    save_config(cfg, run_dir / "config.yaml")

Unknown keys and wrongly typed values are errors (ConfigError, one line), never ignored.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), base: T | None = None) -> T:
    """Defaults of `cls` (or the preset `base`), then the YAML file at `path`, then `key.sub=value` overrides."""
    schema = OmegaConf.structured(base if base is not None else cls)
    layers = [schema]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # yaml errors come in many types
            raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        raise ConfigError(f"configuration of {cls.__name__}{f', key {key}' if key else ''}: {msg}") from None


def from_dict(cls: type[T], data: dict, what: str = "") -> T:
    """A dataclass from a plain dict (a saved config.json, dataclasses.asdict): unknown keys and wrong
    types are a one-line ConfigError naming `what`."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{what or cls.__name__}: {str(e).splitlines()[0]}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    from common.atomic import atomic_write_text
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def config_hash(data: Any) -> str:
    """Stable short hash of a JSON-able value (dataclass instances are converted)."""
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (ints, strings), the same in every process and on every machine
    (Python's hash() of a string changes per process)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def cache_home() -> Path:
    """This project's per-user cache: $ISO3D_CACHE, default ~/.cache/iso3d (converted checkpoints, digests)."""
    import os
    return Path(os.environ.get("ISO3D_CACHE", "~/.cache/iso3d")).expanduser()


def file_digest(path: str | Path) -> str:
    """The identity of a (large) file: the SHA-256 of its whole content, 16 hex digits. It keys caches of
    converted checkpoints, VAE latents and CLIP embeddings, so two files that differ anywhere differ here.
    Reading a 10 GB checkpoint takes tens of seconds, so the result is remembered in
    cache_home()/digests/ for a file whose resolved path, inode, size and mtime are unchanged (a file
    replaced or rewritten in place changes its mtime; `cp -p` and `touch -r` are the ways to fool it)."""
    import os
    from common.atomic import atomic_write_text
    p = Path(path).resolve()
    st = p.stat()
    stamp = {"path": str(p), "inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = cache_home() / "digests" / f"{hashlib.sha256(str(p).encode()).hexdigest()[:32]}.json"
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("digest"), str):
            return known["digest"]
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    digest = h.hexdigest()[:16]
    if os.stat(p).st_mtime_ns != st.st_mtime_ns:
        raise OSError(f"{p}: changed while its digest was computed")
    try:
        atomic_write_text(memo, json.dumps({**stamp, "digest": digest}))
    except OSError:
        pass          # a read-only cache costs time, not correctness
    return digest


def git_commit(repo: str | Path) -> str | None:
    """The short commit hash the working tree at `repo` is on (recorded beside results), None outside git."""
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=repo).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
