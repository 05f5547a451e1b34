import hashlib
import json
import os
import time

import pytest
import trimesh

from render.sources import SourceError, demo_objects, list_objects, objaverse_annotations, resolve, sanitize_uid
from tests.conftest import DATA
from tests.objaverse_mirror import make_mirror


@pytest.mark.parametrize("original", ["../../etc/passwd", "a/b/c.glb", "ünïcødé ☃.glb", "..", ".hidden", "",
                                      "x" * 300, "con\x00trol", "a..b"])
def test_sanitized_uids_are_safe_path_components(original):
    uid = sanitize_uid(original)
    assert uid and len(uid) <= 96
    assert "/" not in uid and "\\" not in uid and ".." not in uid and not uid.startswith(".")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in uid)


def test_sanitize_keeps_clean_ids_and_separates_similar_ones():
    assert sanitize_uid("8476c4170df24cf5bbe6967222d1a42d") == "8476c4170df24cf5bbe6967222d1a42d"
    assert sanitize_uid("a/b") != sanitize_uid("a_b") != sanitize_uid("a b")
    assert sanitize_uid("x" * 300) != sanitize_uid("x" * 299)


def test_demo_set_is_deterministic_and_loadable(tmp_path):
    a = demo_objects(tmp_path / "a", count=8, seed=3)
    b = demo_objects(tmp_path / "b", count=8, seed=3)
    c = demo_objects(tmp_path / "c", count=8, seed=4)
    digest = lambda refs: [hashlib.sha256(open(r.locator, "rb").read()).hexdigest() for r in refs]  # noqa: E731
    assert digest(a) == digest(b) and digest(a) != digest(c)
    kinds = set()
    for ref in a:
        mesh = trimesh.load(ref.locator, force="mesh")
        assert len(mesh.faces) > 10 and mesh.extents.max() > 0.2
        kinds.add(type(mesh.visual).__name__)
    assert kinds == {"TextureVisuals", "ColorVisuals"}   # some textured, some plainly coloured


def test_folder_source_lists_supported_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["a.glb", "sub/b.OBJ", "c.ply", "notes.txt", "d.blend"]:
        (tmp_path / name).write_bytes(b"x")
    os.mkfifo(tmp_path / "pipe.stl")
    refs = list_objects(str(tmp_path), tmp_path / "cache")
    assert sorted(r.original_id for r in refs) == ["a.glb", "c.ply", "pipe.stl", "sub/b.OBJ"]
    assert {r.uid for r in refs} == {"a.glb", "c.ply", "pipe.stl", sanitize_uid("sub/b.OBJ")}
    with pytest.raises(SourceError, match="not a directory"):
        list_objects(str(tmp_path / "missing"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no glb"):
        list_objects(str(tmp_path / "empty"), tmp_path)


def test_objaverse_source_against_a_local_mirror(tmp_path):
    glb = DATA / "glb" / "Box.glb"
    uids = ["0001aaaa", "0002bbbb", "0003cccc"]
    mirror = make_mirror(tmp_path / "mirror", {u: glb for u in uids}, {"chair": ["0001aaaa", "0003cccc"]})
    refs = list_objects("objaverse", tmp_path, objaverse_dir=str(mirror))
    assert [r.uid for r in refs] == uids and {r.source for r in refs} == {"objaverse"}
    chairs = list_objects("objaverse", tmp_path, objaverse_dir=str(mirror), lvis_categories=["chair"])
    assert [r.uid for r in chairs] == ["0001aaaa", "0003cccc"]
    picked = list_objects("objaverse", tmp_path, objaverse_dir=str(mirror), uids=["0002bbbb"])
    assert picked[0].locator == "glbs/000-000/0002bbbb.glb"          # the path index, read once per listing
    assert resolve(picked[0], str(mirror)).read_bytes() == glb.read_bytes()
    annotations = objaverse_annotations(refs, str(mirror))
    assert annotations["0002bbbb"]["name"] == "object 0002bbbb" and annotations["0002bbbb"]["license"] == "by"
    with pytest.raises(SourceError, match="unknown LVIS"):
        list_objects("objaverse", tmp_path, objaverse_dir=str(mirror), lvis_categories=["spaceship"])
    with pytest.raises(SourceError, match="not in Objaverse"):
        list_objects("objaverse", tmp_path, objaverse_dir=str(mirror), uids=["ffff"])


def test_objaverse_files_are_fetched_into_the_package_cache_over_http(tmp_path, monkeypatch):
    """A cache holding only the path index: the object and its folder's metadata file come from the server
    (a mirror on 127.0.0.1 here, ISO3D_OBJAVERSE_URL; Hugging Face by default), into objaverse's layout."""
    import functools
    import gzip
    import http.server
    import shutil
    import threading
    glb = DATA / "glb" / "Box.glb"
    served = make_mirror(tmp_path / "served", {"0001aaaa": glb, "0002bbbb": glb}, {})
    cache = tmp_path / "cache" / "hf-objaverse-v1"
    cache.mkdir(parents=True)
    shutil.copy(served / "hf-objaverse-v1" / "object-paths.json.gz", cache)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served / "hf-objaverse-v1"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("ISO3D_OBJAVERSE_URL", f"http://127.0.0.1:{server.server_port}")
    try:
        refs = list_objects("objaverse", tmp_path, objaverse_dir=str(tmp_path / "cache"))
        path = resolve(refs[1], str(tmp_path / "cache"))
        assert path == cache / "glbs" / "000-000" / "0002bbbb.glb" and path.read_bytes() == glb.read_bytes()
        assert objaverse_annotations(refs, str(tmp_path / "cache"))["0001aaaa"]["name"] == "object 0001aaaa"
        assert (cache / "metadata" / "000-000.json.gz").is_file() and not list(cache.rglob(".*tmp*"))
        with gzip.open(cache / "object-paths.json.gz", "wt") as f:     # a hostile index
            json.dump({"0003cccc": "../../../outside.glb"}, f)
        hostile = list_objects("objaverse", tmp_path, objaverse_dir=str(tmp_path / "cache"))
        with pytest.raises(SourceError, match="leaves the Objaverse cache"):
            resolve(hostile[0], str(tmp_path / "cache"))
    finally:
        server.shutdown()


def test_demo_objects_stand_upright_in_gltf_y_up(tmp_path):
    """glTF's up axis is +y (Blender turns it into +z): the table's 0.54-unit height must lie along y."""
    refs = demo_objects(tmp_path, count=7)
    table = trimesh.load(next(r.locator for r in refs if r.uid.endswith("table")), force="mesh")
    assert table.extents[1] == pytest.approx(0.54, abs=1e-6)
    assert table.bounds[0][1] == pytest.approx(0.0, abs=1e-6)     # legs on the ground, top up


def test_downloads_time_out_retry_and_fail_with_the_url(tmp_path, monkeypatch):
    """A server that stalls is given up on after the timeout (each try), one that fails once is retried; the
    last failure names the URL; nothing is left under a temporary name."""
    import http.server
    import threading
    from render.sources import _fetch
    requests = {"flaky": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.endswith("stall.bin"):
                time.sleep(3)                             # longer than the timeout below, by 10x
                return
            requests["flaky"] += 1
            if requests["flaky"] == 1:
                self.send_error(500)
                return
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("ISO3D_OBJAVERSE_URL", f"http://127.0.0.1:{server.server_port}")
    try:
        _fetch("glbs/flaky.bin", tmp_path / "flaky.bin", timeout_s=5, attempts=2)
        assert (tmp_path / "flaky.bin").read_bytes() == b"hello" and requests["flaky"] == 2
        with pytest.raises(SourceError, match=r"download http://127\.0\.0\.1:\d+/glbs/stall\.bin: failed 2 times.*timed out"):
            _fetch("glbs/stall.bin", tmp_path / "stall.bin", timeout_s=0.3, attempts=2)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["flaky.bin"]
    finally:
        server.shutdown()
