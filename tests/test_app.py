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
    # Two requests at once (so that two of the same picture meet), only the offered checkpoint, uploads up to 1 MB.
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipelines" / "app.py"), "--checkpoint", str(tiny_checkpoint),
                             "--output", str(out / "results"), "--port", str(port), "--segmenter", str(segmenter),
                             "--concurrency", "2", "--checkpoints", "offered", "--max-upload-mb", "1", *SETTINGS],
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
    yield {"url": url, "out": out, "pid": proc.pid, "chromium": chromium, "segmenter": segmenter,
           "checkpoint": str(tiny_checkpoint)}
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


def test_a_photo_is_cut_out_generated_viewed_and_downloaded(app, browser, tmp_path):
    """A photo (a red object on a textured wall, JPEG, no alpha) through the page, as a user would: the background
    box is ticked (the app was given a segmenter), generate.py cuts it out exactly as the CLI does and the page
    shows that input; the 3D viewer shows the mesh, the download is the binary glTF; the same photo again is the
    cached result, no second run. (RGBA renders go through the app in the soak below.)"""
    from optimize3d.inputs import image_digest, load_input_image
    from optimize3d.preprocess import PreprocessConfig, preprocess
    photo, _ = photo_like(320, 240, seed=3)
    image = tmp_path / "photo.jpg"
    photo.save(image, quality=92)
    page = browser.new_page()
    page.goto(app["url"])
    page.wait_for_selector("#generate")
    assert page.is_checked("#remove-background input[type=checkbox]")
    status = generate(page, app, image)
    assert status.startswith("done:")
    page.wait_for_selector("#mesh canvas")                            # the 3D viewer shows the mesh
    href = page.get_attribute("#download a[href*='mesh.glb']", "href")
    with urllib.request.urlopen(urllib.parse.urljoin(app["url"], href), timeout=30) as r:
        assert r.read(4) == b"glTF"                                   # the download is the binary glTF
    assert page.get_attribute("#views img", "src") and page.get_attribute("#turntable img", "src")
    assert page.get_attribute("#model-input img", "src")
    results = app["out"] / "results"
    assert [p.name for p in (results / "inputs").iterdir()] and len(list(results.glob("*/mesh.glb"))) == 1
    stem = image_digest(image)[:16]                                   # the upload's name under inputs/
    (run,) = results.glob(f"{stem}-*/cmd.txt")
    assert "--remove-background" in run.read_text()
    expected, _ = preprocess(load_input_image(image), PreprocessConfig(remove_background=True,
                                                                       segmenter=str(app["segmenter"])), "photo.jpg")
    seen = np.asarray(Image.open(run.parent / "input.png"))
    assert np.array_equal(seen, np.asarray(expected))                  # the CLI's step, the CLI's result
    # The same photo again: the cached result, no second run.
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


# One request as a separate client process (gradio_client), printing each update of the page's status box. It
# downloads no output file: gradio_client 2.7 leaves an empty /tmp/<40 hex digits> folder behind per download.
CLIENT = """
import sys
from gradio_client import Client, handle_file
url, image, checkpoint = sys.argv[1:4]
job = Client(url, verbose=False, download_files=False).submit(handle_file(image), checkpoint, False, api_name="/generate")
try:
    for out in job:
        print("STATUS", out[0], flush=True)
    print("END", job.outputs()[-1][0], flush=True)
except Exception as e:
    print("ERROR", str(e).replace(chr(10), " "), flush=True)
"""


def request(app, image, disconnect: bool) -> str:
    """One client's request; `disconnect`: SIGKILL the client (its connections drop, as a closed tab's do) at
    its first update after the preprocessed input, i.e. while its generate.py runs or waits."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, app["url"], str(image), app["checkpoint"]],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    last = ""
    for line in proc.stdout:
        last = line.strip()
        if disconnect and last.startswith("STATUS") and not last.startswith("STATUS preprocessed"):
            proc.kill()
            break
    proc.wait(timeout=600)
    return "DISCONNECTED" if disconnect and proc.returncode < 0 else last


def test_soak_6_requests_3_clients_some_disconnecting_some_repeating(app, rendered_demo):
    """6 requests for 2 pictures from 3 concurrent clients (one more than the 2 the app generates at once, so
    one request always waits), each picture's first request disconnecting mid-run: every staying request gets
    its picture's one result, each picture is made once (repeats wait on its lock, then find it, or resume the
    disconnected run's .partial), and no generate.py and no .partial folder is left."""
    import psutil
    from concurrent.futures import ThreadPoolExecutor
    from optimize3d.inputs import image_digest
    pictures = [object_dir(rendered_demo, uid) / "fixed" / "004.png" for uid in ("demo2-0-001-sphere", "demo2-0-003-cone")]
    plan = [(pictures[i % 2], i < 2) for i in range(6)]        # each picture: 1 disconnecting, then 2 staying
    with ThreadPoolExecutor(3) as clients:
        outcomes = list(clients.map(lambda job: request(app, *job), plan))
    for (picture, disconnect), outcome in zip(plan, outcomes):
        assert outcome == "DISCONNECTED" if disconnect else outcome.startswith(("END done:", "END cached:")), outcome
    results = app["out"] / "results"
    for picture in pictures:
        made = {o.split(": ", 1)[1] for (p, d), o in zip(plan, outcomes) if p == picture and o.startswith("END")}
        stem = image_digest(picture)[:16]
        assert len(made) == 1 and [str(d) for d in results.glob(f"{stem}-*") if d.is_dir()] == list(made), made
    app_process = psutil.Process(app["pid"])
    generating = [p for p in app_process.children(recursive=True) if "generate.py" in " ".join(p.cmdline())]
    assert not psutil.wait_procs(generating, timeout=90)[1], "a disconnected client's generate.py is still running"
    assert not list(results.glob("*.partial"))
    assert "a client went away: stopping generate.py" in (app["out"] / "app.log").read_text()


def test_only_the_offered_checkpoints_and_uploads_up_to_the_limit_are_accepted(app, rendered_demo, tmp_path):
    import httpx
    from gradio_client import Client, handle_file
    image = object_dir(rendered_demo, "demo2-0-000-box") / "fixed" / "000.png"
    client = Client(app["url"], verbose=False, download_files=False)
    with pytest.raises(Exception, match="is not in the list of choices"):      # refused by the server, not the page
        client.predict(handle_file(str(image)), str(tmp_path), False, api_name="/generate")
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), np.uint8)).save(big)
    assert big.stat().st_size > 1 << 20
    with open(big, "rb") as f:
        r = httpx.post(urllib.parse.urljoin(app["url"], "gradio_api/upload"), files={"files": f}, timeout=60)
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert not list((app["out"] / "results" / "inputs").glob("*")) or \
        all(p.stat().st_size < 1 << 20 for p in (app["out"] / "results" / "inputs").iterdir())
