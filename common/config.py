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


def file_digest(path: str | Path) -> str:
    """A cheap identity of a large file (weights): its size + a hash of its first and last MiB."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]
