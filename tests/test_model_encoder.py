import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from model.encoder import EncoderConfig, ImageEncoder


def test_tiny_encoder_shapes_and_white_compositing():
    enc = ImageEncoder(EncoderConfig.tiny())
    assert not any(p.requires_grad for p in enc.parameters())
    transparent = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    white = Image.new("RGB", (40, 40), "white")
    red = Image.new("RGB", (40, 40), "red")
    e = enc.encode([transparent, white, red])
    assert e.shape == (3, 64)
    torch.testing.assert_close(e[0], e[1])                 # alpha 0 is white, not the hidden colour
    assert (e[0] - e[2]).abs().max() > 1e-3
    assert enc.identity.startswith("iso3d-tiny-vit:random-init")


def test_local_weights_file_is_loaded_by_open_clips_own_loader(tmp_path):
    import open_clip
    source = open_clip.create_model("iso3d-tiny-vit", pretrained=None)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    enc = ImageEncoder(EncoderConfig(model="iso3d-tiny-vit", weights=str(path)))
    x = enc.preprocess([Image.new("RGB", (64, 64), "blue")])
    torch.testing.assert_close(enc.visual(x), source.visual.eval()(x))
    assert enc.identity != ImageEncoder(EncoderConfig.tiny()).identity
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        ImageEncoder(EncoderConfig(model="iso3d-tiny-vit", weights=str(tmp_path / "nope.bin")))
