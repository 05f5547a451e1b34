import numpy as np
import pytest

from render import cameras


def test_intrinsics_match_syncdreamer_at_256():
    np.testing.assert_allclose(cameras.intrinsics(256), [[280, 0, 128], [0, 280, 128], [0, 0, 1]])


@pytest.mark.parametrize("az,el", [(0, 0), (22.5, 30), (200, -10), (359, 40), (90, 89.9)])
def test_camera_looks_at_origin(az, el):
    c2w = cameras.c2w_opencv(az, el, 1.5)
    np.testing.assert_allclose(np.linalg.norm(c2w[:3, 3]), 1.5)
    np.testing.assert_allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.linalg.det(c2w[:3, :3]) == pytest.approx(1.0)
    # OpenCV: +Z looks forward, towards the origin.
    np.testing.assert_allclose(c2w[:3, 2], -c2w[:3, 3] / 1.5, atol=1e-12)
    uv = cameras.project(np.zeros((1, 3)), cameras.intrinsics(256), c2w)
    np.testing.assert_allclose(uv, [[128, 128]], atol=1e-9)


def test_world_up_projects_upwards_and_azimuth_turns_counterclockwise():
    K, c2w = cameras.intrinsics(256), cameras.c2w_opencv(0, 0, 1.5)
    top, bottom = cameras.project(np.array([[0, 0, 0.4], [0, 0, -0.4]]), K, c2w)
    assert top[1] < 128 < bottom[1]  # image y grows downwards
    np.testing.assert_allclose(cameras.camera_position(90, 0, 2.0), [0, 2, 0], atol=1e-12)
    np.testing.assert_allclose(cameras.camera_position(0, 90, 2.0), [0, 0, 2], atol=1e-12)


def test_blender_and_opencv_differ_by_the_axis_flip():
    b, c = cameras.c2w_blender(45, 20, 1.5), cameras.c2w_opencv(45, 20, 1.5)
    np.testing.assert_allclose(b[:3, 1], -c[:3, 1])
    np.testing.assert_allclose(b[:3, 2], -c[:3, 2])
    np.testing.assert_allclose(b[:3, 0], c[:3, 0])


def test_view_sets():
    fixed = cameras.fixed_angles()
    assert [a for a, _ in fixed] == [i * 22.5 for i in range(16)]
    assert {e for _, e in fixed} == {30.0}
    rand = cameras.random_angles(np.random.default_rng(0))
    assert [a for a, _ in rand] == [i * 22.5 for i in range(16)]
    assert all(-10 <= e <= 40 for _, e in rand) and len({e for _, e in rand}) == 16


def test_seed_is_stable_and_depends_on_uid_and_base():
    assert cameras.seed_for("abc") == cameras.seed_for("abc")
    assert cameras.seed_for("abc") != cameras.seed_for("abd")
    assert cameras.seed_for("abc", 1) != cameras.seed_for("abc", 0)
    assert 0 <= cameras.seed_for("abc") < 2**63
