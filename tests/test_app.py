"""pipelines/app.py driven in real headless Chromium (Debian's chromium, through Playwright; .ci/run and
`make setup-browser` install it): upload, generate, the mesh viewer and the download, the cache, a refusal."""
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from render.layout import object_dir
from tests.conftest import ROOT, chromium_path
from tests.photos import colour_segmenter, photo_like

# The 3D stage at toy size: the test is about the app, not about quality.
SETTINGS = ["--steps", "4", "val_every=2", "ckpt_every=2", "preview_steps=2", "export.resolution=32", "export.threshold=3",
            "export.turntable_frames=4", "export.turntable_size=32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tiny_checkpoint, tmp_path_factory):
    chromium = chromium_path()
    out = tmp_path_factory.mktemp("app")
    segmenter = colour_segmenter(out / "segmenter.onnx")
    port = free_port()
    log = open(out / "app.log", "wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipelines" / "app.py"), "--checkpoint", str(tiny_checkpoint),
                             "--output", str(out / "results"), "--port", str(port), "--segmenter", str(segmenter), *SETTINGS],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180                   # a readiness wait, not a timing assertion
    while True:
        assert proc.poll() is None, (out / "app.log").read_text()[-2000:]
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            assert time.time() < deadline, "the app did not answer within 180 s"
            time.sleep(0.5)
    yield {"url": url, "out": out, "pid": proc.pid, "chromium": chromium, "segmenter": segmenter}
    os.killpg(proc.pid, 9)
    proc.wait()
    log.close()


@pytest.fixture(scope="module")
def browser(app):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=app["chromium"],
                              args=["--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader"])
        yield b
        b.close()


def generate(page, app, image) -> str:
    page.goto(app["url"])
    page.wait_for_selector("#generate")
    page.set_input_files("#input-image input[type=file]", str(image))
    page.wait_for_selector("#input-image img")
    page.click("#generate")
    page.wait_for_function("() => { const t = document.querySelector('#status textarea');"
                           " return t && /^(done|cached):/.test(t.value); }", timeout=600_000)
    return page.input_value("#status textarea")


def test_upload_generate_view_and_download_the_mesh(app, browser, rendered_demo):
    page = browser.new_page()
    image = object_dir(rendered_demo, "demo2-0-000-box") / "fixed" / "000.png"
    status = generate(page, app, image)
    assert status.startswith("done:")
    page.wait_for_selector("#mesh canvas")                            # the 3D viewer shows the mesh
    href = page.get_attribute("#download a[href*='mesh.glb']", "href")
    with urllib.request.urlopen(urllib.parse.urljoin(app["url"], href), timeout=30) as r:
        assert r.read(4) == b"glTF"                                   # the download is the binary glTF
    assert page.get_attribute("#views img", "src") and page.get_attribute("#turntable img", "src")
    results = app["out"] / "results"
    assert [p.name for p in (results / "inputs").iterdir()] and len(list(results.glob("*/mesh.glb"))) == 1
    # The same image again: the cached result, no second run.
    page2 = browser.new_page()
    assert generate(page2, app, image).startswith("cached:")
    assert len(list(results.glob("*/mesh.glb"))) == 1


def test_bad_image_is_refused_with_the_clis_message(app, browser, tmp_path):
    clear = tmp_path / "clear.png"
    Image.fromarray(np.zeros((64, 64, 4), np.uint8), "RGBA").save(clear)
    page = browser.new_page()
    page.goto(app["url"])
    page.wait_for_selector("#generate")
    page.set_input_files("#input-image input[type=file]", str(clear))
    page.wait_for_selector("#input-image img")
    page.click("#generate")
    page.wait_for_selector("text=transparent", timeout=60_000)          # generate.py's one-line reason, as a toast
    assert not list((app["out"] / "results").glob("clear*"))


def test_listens_on_loopback_only(app):
    import psutil
    listening = [c.laddr for c in psutil.Process(app["pid"]).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_a_photo_is_cut_out_and_shown_as_the_model_sees_it(app, browser, tmp_path):
    from optimize3d.inputs import image_digest, load_input_image
    from optimize3d.preprocess import PreprocessConfig, preprocess
    photo, _ = photo_like(320, 240, seed=3)
    photo.save(tmp_path / "photo.jpg", quality=92)
    page = browser.new_page()
    page.goto(app["url"])
    page.wait_for_selector("#generate")
    assert page.is_checked("#remove-background input[type=checkbox]")   # ticked: the app was given a segmenter
    assert generate(page, app, tmp_path / "photo.jpg").startswith("done:")
    assert page.get_attribute("#model-input img", "src")
    stem = image_digest(tmp_path / "photo.jpg")[:16]                    # the upload's name under inputs/
    (run,) = (app["out"] / "results").glob(f"{stem}-*/cmd.txt")
    assert "--remove-background" in run.read_text()
    expected, _ = preprocess(load_input_image(tmp_path / "photo.jpg"),
                             PreprocessConfig(remove_background=True, segmenter=str(app["segmenter"])), "photo.jpg")
    seen = np.asarray(Image.open(run.parent / "input.png"))
    assert np.array_equal(seen, np.asarray(expected))                  # the CLI's step, the CLI's result
