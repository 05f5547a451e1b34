import pytest

from common.config import ConfigError, config_hash, load_config, save_config
from render.settings import RenderConfig, RenderSettings


def test_defaults_yaml_and_dotted_overrides(tmp_path):
    cfg = load_config(RenderConfig)
    assert cfg.settings.resolution == 256 and cfg.timeout == 900
    (tmp_path / "c.yaml").write_text("settings:\n  samples: 64\ntimeout: 10\n")
    cfg = load_config(RenderConfig, tmp_path / "c.yaml", ["settings.samples=8", "settings.hdris=[city,night]"])
    assert (cfg.settings.samples, cfg.timeout, cfg.settings.hdris) == (8, 10.0, ["city", "night"])
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(RenderConfig, tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize("overrides,match", [
    (["settings.sample=8"], "sample"),            # a typo is an error, not ignored
    (["timeout=soon"], "timeout"),
    (["settings.resolution"], "key.sub=value"),
])
def test_bad_overrides_are_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(RenderConfig, None, overrides)
    assert "\n" not in str(e.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(RenderConfig, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("settings: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(RenderConfig, tmp_path / "bad.yaml")


def test_settings_key_changes_with_any_pixel_setting():
    base = load_config(RenderConfig).settings
    assert base.key() == load_config(RenderConfig).settings.key()
    for override in ["settings.samples=33", "settings.resolution=128", "settings.seed=1", "settings.denoiser=high"]:
        assert load_config(RenderConfig, None, [override]).settings.key() != base.key(), override
    # how the work is run does not change the pixels, so not the key
    assert load_config(RenderConfig, None, ["timeout=5", "num_workers=8"]).settings.key() == base.key()
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})


def test_settings_added_later_keep_the_cache_key_of_objects_rendered_before_them():
    """Keys written by the code before adaptive sampling existed (measured then): renders made before a
    setting was added stay complete while it is at the value that renders as before."""
    before = {"adaptive_threshold": 0.0, "min_samples": 0}     # adaptive sampling off: as rendered then
    assert RenderSettings(samples=16, denoiser="fast", **before).key() == "65867438ccae034b"
    assert RenderSettings(samples=24, denoiser="high", seed=3, **before).key() == "06d9f13fac559e46"
    assert RenderSettings(samples=16, denoiser="fast", adaptive_threshold=0.05, min_samples=8).key() != "65867438ccae034b"


def test_file_digest_sees_the_whole_file_and_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    """Two 3 MiB files that differ in one middle byte (the old digest read only the first and last MiB)
    differ; the digest is remembered by path, size and mtime: a file rewritten behind an unchanged mtime
    keeps its remembered digest (what the memo is for), a new mtime makes it read again."""
    import hashlib
    import os
    from common.config import file_digest
    monkeypatch.setenv("ISO3D_CACHE", str(tmp_path / "cache"))
    data = bytearray(os.urandom(3 << 20))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(bytes(data))
    data[len(data) // 2] ^= 1
    b.write_bytes(bytes(data))
    assert file_digest(a) != file_digest(b)
    assert file_digest(b) == hashlib.sha256(bytes(data)).hexdigest()[:16]
    assert len(list((tmp_path / "cache" / "digests").iterdir())) == 2
    remembered = file_digest(a)
    stamp = os.stat(a)
    a.write_bytes(bytes(data))                          # b's content, a's old mtime
    os.utime(a, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert file_digest(a) == remembered
    os.utime(a, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    assert file_digest(a) == file_digest(b)
