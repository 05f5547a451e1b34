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


def test_released_preprocessing_equals_the_released_code():
    """tests/data/clip-rgba-333x300-released.npz holds what the released inference's own steps (its
    prepare_embeddings and FrozenOpenCLIPImageEmbedder.preprocess, run outside the project with cv2.imread)
    give for tests/data/clip-rgba-333x300.png at 224 px: 8x8-pooled values, row 112 and column 40."""
    import numpy as np
    from model.encoder import preprocess
    from tests.conftest import DATA
    expected = np.load(DATA / "clip-rgba-333x300-released.npz")
    img = Image.open(DATA / "clip-rgba-333x300.png")
    x = preprocess([img], 224, "isotropic3d-release")[0]
    assert x.shape == (3, 224, 224)
    np.testing.assert_allclose(torch.nn.functional.avg_pool2d(x[None], 8)[0].numpy(), expected["pooled8"], atol=1e-5)
    np.testing.assert_allclose(x[:, 112, :].numpy(), expected["row112"], atol=1e-5)
    np.testing.assert_allclose(x[:, :, 40].numpy(), expected["col40"], atol=1e-5)
    # The project's own preprocessing (one antialiased resize of the composite) is measurably different.
    ours = preprocess([img], 224, "project")[0]
    assert (ours - x).abs().mean() > 5e-3
    enc = ImageEncoder(EncoderConfig.tiny(), "isotropic3d-release")
    assert enc.identity != ImageEncoder(EncoderConfig.tiny()).identity       # embedding caches keep them apart
    assert torch.allclose(enc.preprocess([img]), preprocess([img], 64, "isotropic3d-release"))
