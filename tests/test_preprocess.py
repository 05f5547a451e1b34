"""optimize3d/preprocess.py: background removal through rembg's real ONNX path (a segmenter the test builds), the
training framing, the warning on photos, the cache key; and generate.py with a photo, end to end at toy size."""
import numpy as np
import pytest
from PIL import Image

from optimize3d.inputs import InputImageError, load_input_image
from optimize3d.config import GenerateConfig
from optimize3d.image_to_3d import output_key
from optimize3d.preprocess import PreprocessConfig, alpha_box, alpha_fill, frame, input_warnings, preprocess
from render.preview import on_white
from tests.conftest import ROOT, run_main
from tests.photos import colour_segmenter, photo_like

RENDER = ROOT / "tests" / "data" / "render-demo-box-fixed-000.png"   # render_objaverse.py --source demo, 64 px, fixed view 0
TOY = ["--steps", "2", "val_every=2", "ckpt_every=2", "preview_steps=2", "export.resolution=24", "export.threshold=1",
       "export.turntable_frames=2", "export.turntable_size=24"]


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return colour_segmenter(tmp_path_factory.mktemp("segmenter") / "colour.onnx")


@pytest.fixture
def photo(tmp_path):
    image, mask = photo_like(400, 300)
    image.save(tmp_path / "photo.jpg", quality=92)
    return tmp_path / "photo.jpg", mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def box_centre_and_side(rgba: Image.Image) -> tuple[float, float, int]:
    x0, y0, x1, y1 = alpha_box(np.asarray(rgba)[..., 3])
    return (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)


def test_the_segmenter_cuts_the_object_out_of_a_photo(photo, segmenter):
    path, mask = photo
    cfg = PreprocessConfig(remove_background=True, segmenter=str(segmenter), frame=False)
    rgba, warnings = preprocess(load_input_image(path), cfg, path.name)
    alpha = np.asarray(rgba)[..., 3]
    assert rgba.size == (400, 300) and warnings == []
    assert iou(alpha >= 128, mask) > 0.95                      # measured 0.99; the whole picture would be 0.2
    assert alpha[~mask].mean() < 10 and alpha[mask].mean() > 240
    assert np.array_equal(np.asarray(rgba)[..., :3], np.asarray(Image.open(path).convert("RGB")))   # colours untouched


@pytest.mark.parametrize("size,fill", [(256, 0.8), (100, 0.6)])
@pytest.mark.parametrize("shape", ["wide", "tall"])
def test_framing_centres_the_object_at_the_set_fill(size, fill, shape):
    a = np.zeros((300, 500, 4), np.uint8)
    box = (40, 200, 310, 260) if shape == "wide" else (350, 10, 420, 290)        # off centre, touching nothing
    a[box[1]:box[3], box[0]:box[2]] = [255, 0, 0, 255]
    out = frame(Image.fromarray(a, "RGBA"), fill, size)
    cx, cy, side = box_centre_and_side(out)
    assert out.size == (size, size)
    assert abs(cx - size / 2) <= 2 and abs(cy - size / 2) <= 2
    assert abs(side - fill * size) <= 2
    rgb, alpha = np.asarray(out)[..., :3], np.asarray(out)[..., 3]
    assert rgb[alpha > 8][:, 0].min() >= 240                 # premultiplied resampling: no dark fringe at the edge


def test_a_render_keeps_its_look_and_is_framed_like_the_renders():
    render = load_input_image(RENDER)
    assert input_warnings(render, PreprocessConfig(), "render") == []
    assert input_warnings(on_white(render), PreprocessConfig(), "render on white") == []
    framed, _ = preprocess(render, PreprocessConfig(size=64), "render")
    assert abs(alpha_fill(framed) - 0.8) <= 2 / 64
    same, _ = preprocess(render, PreprocessConfig(frame=False), "render")
    assert np.array_equal(np.asarray(same), np.asarray(render))
    # Composited on white (an RGB render), the object is found by its non-white pixels and framed alike.
    rgb_framed, _ = preprocess(on_white(render), PreprocessConfig(size=64), "render on white")
    x, y, side = box_centre_and_side(framed)
    nonwhite = np.where(np.asarray(on_white(rgb_framed)).min(axis=-1) < 250, 255, 0)
    x0, y0, x1, y1 = alpha_box(nonwhite)
    assert abs((x0 + x1) / 2 - x) <= 1.5 and abs((y0 + y1) / 2 - y) <= 1.5 and abs(max(x1 - x0, y1 - y0) - side) <= 2


def test_a_photo_without_background_removal_is_warned_about_or_refused(photo):
    path, _ = photo
    picture = load_input_image(path)
    (warning,) = input_warnings(picture, PreprocessConfig(), path.name)
    assert "photo.jpg" in warning and "not white" in warning and "--remove-background" in warning
    with pytest.raises(InputImageError, match="not white.*strict"):
        input_warnings(picture, PreprocessConfig(strict=True), path.name)


def test_bad_segmenter_settings_are_one_line_errors(tmp_path, photo):
    with pytest.raises(ValueError, match="needs a segmenter"):
        PreprocessConfig(remove_background=True).validate()
    with pytest.raises(ValueError, match="not a file"):
        PreprocessConfig(segmenter=str(tmp_path / "missing.onnx")).validate()
    (tmp_path / "junk.onnx").write_text("not a model")
    cfg = PreprocessConfig(remove_background=True, segmenter=str(tmp_path / "junk.onnx"))
    with pytest.raises(InputImageError, match="junk.onnx: not a loadable ONNX model") as e:
        preprocess(load_input_image(photo[0]), cfg, "photo.jpg")
    assert "\n" not in str(e.value)


def test_the_cache_key_covers_the_settings_and_the_segmenters_content(tmp_path, segmenter):
    def key(**settings):
        cfg = GenerateConfig.tiny()
        for k, v in settings.items():
            setattr(cfg.preprocess, k, v)
        return output_key("image-sha", "checkpoint", cfg)
    copy = tmp_path / "elsewhere.onnx"
    copy.write_bytes(segmenter.read_bytes())
    other = colour_segmenter(tmp_path / "other.onnx")
    other.write_bytes(other.read_bytes().replace(b"colour_segmenter", b"colour_segmenteR"))
    assert key(segmenter=str(segmenter)) == key(segmenter=str(copy))           # where the file lies does not count
    assert len({key(), key(fill=0.7), key(frame=False), key(remove_background=True, segmenter=str(segmenter)),
                key(segmenter=str(segmenter)), key(segmenter=str(other))}) == 6


def test_generate_with_a_photo_sees_the_cut_out_object(photo, segmenter, tiny_checkpoint, tmp_path, capsys):
    path, mask = photo
    out = tmp_path / "out"
    # Without the flag: a one-line warning naming the flag; with --strict: refused before any model loads.
    code, _, err = run_main("generate", ["--image", path, "--checkpoint", tiny_checkpoint, "--output", out, "--strict", *TOY],
                            capsys)
    assert code == 2 and "not white" in err and err.strip().count("\n") == 0 and not out.exists()
    code, _, err = run_main("generate", ["--image", path, "--checkpoint", tiny_checkpoint, "--output", out,
                                         "--remove-background", "--segmenter", segmenter, *TOY], capsys)
    assert code == 0, err
    assert "warning" not in err
    (run,) = [p for p in out.iterdir() if p.name.startswith("photo-") and p.is_dir()]   # (and its .lock)
    seen = Image.open(run / "input.png")
    assert seen.mode == "RGBA" and seen.size == (256, 256)
    assert abs(alpha_fill(seen) - 0.8) <= 2 / 256
    # What the model saw is what multiview.png shows first (on white, at the model's size).
    sheet = np.asarray(Image.open(run / "multiview.png"), float)
    tile = sheet.shape[0]
    first = np.asarray(on_white(seen).resize((tile, tile)), float)
    assert np.abs(sheet[:, :tile] - first).mean() < 1
    assert (run / "config.yaml").read_text().count("remove_background: true") == 1


def test_the_app_shows_the_preprocessed_input_before_generation_starts(photo, segmenter, tmp_path):
    from pipelines.app import handle_request, preprocess_settings
    path, _ = photo
    settings = preprocess_settings([], segmenter)
    requests = handle_request(str(path), "some/checkpoint", True, tmp_path, settings, [])
    status, seen, *rest = next(requests)                               # the first update of the page
    requests.close()
    assert status == "preprocessed" and rest == [None] * 5
    assert Image.open(seen).mode == "RGBA" and abs(alpha_fill(Image.open(seen)) - 0.8) <= 2 / 256
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "logs").exists()   # generate.py not started
    # Unticked, the photo is taken as it is, and the page says why that is a problem.
    requests = handle_request(str(path), "some/checkpoint", False, tmp_path, settings, [])
    status, seen, *_ = next(requests)
    requests.close()
    assert status.startswith("preprocessed (warning: image photo.jpg: RGB with a background that is not white")


def test_the_command_writes_what_the_model_will_see_and_a_figure(photo, segmenter, tmp_path, capsys):
    from optimize3d.preprocess import main
    path, _ = photo
    code = main([str(path), "--output", str(tmp_path / "in.png"), "--remove-background", "--segmenter", str(segmenter),
                 "--figure", str(tmp_path / "fig.png"), "size=128"])
    assert code == 0 and capsys.readouterr().err == ""
    seen = Image.open(tmp_path / "in.png")
    assert seen.size == (128, 128) and abs(alpha_fill(seen) - 0.8) <= 2 / 128
    assert Image.open(tmp_path / "fig.png").size[1] == 128
    assert main([str(path), "--output", str(tmp_path / "x.png"), "fill=3"]) == 2
    err = capsys.readouterr().err
    assert "fill 3.0: expected a fraction" in err and err.count("\n") == 1


def test_a_folder_of_images_is_checked_before_ray_starts(photo, tmp_path, capsys):
    import argparse
    import shutil
    from pipelines.generate import check_inputs
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(photo[0], folder / "photo.jpg")
    shutil.copy(RENDER, folder / "render.png")
    (folder / "broken.png").write_text("not an image")              # its own task reports it
    args = argparse.Namespace(image=None, images=folder)
    check_inputs(args, GenerateConfig.tiny())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("generate.py: warning: image") and "photo.jpg" in err[0]
    cfg = GenerateConfig.tiny()
    cfg.preprocess.strict = True                    # refused by its own task, as a broken file is: the others run
    check_inputs(args, cfg)
    assert capsys.readouterr().err == ""
