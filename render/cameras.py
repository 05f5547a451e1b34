"""Camera maths shared by render/, dataset/ and optimize3d/ (no bpy import here).

World frame: Blender's (z up). A camera at azimuth `az` and elevation `el` sits at
distance * (cos el cos az, cos el sin az, sin el) and looks at the origin (MVDream/threestudio
convention). Two camera conventions appear:
  - Blender/OpenGL: the camera looks down its -Z axis, +Y is up (what Blender's matrix_world is).
  - OpenCV: the camera looks down +Z, +Y is down (what cameras.json stores; K projects it).
OpenCV c2w = Blender c2w @ diag(1, -1, -1, 1).

    >>> K = intrinsics(256)            # [[280, 0, 128], [0, 280, 128], [0, 0, 1]]
    >>> c2w = c2w_opencv(22.5, 30.0, 1.5)
"""
from __future__ import annotations

import math

import numpy as np

NUM_VIEWS = 16            # per view set (random and fixed)
DISTANCE = 1.5            # camera distance from the origin, object in the unit cube
LENS_MM = 35.0
SENSOR_MM = 32.0          # horizontal sensor width (sensor fit HORIZONTAL)
FIXED_ELEVATION = 30.0    # degrees, fixed set
RANDOM_ELEVATION = (-10.0, 40.0)  # degrees, uniform per view, random set
BLENDER_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
FOV_DEG = 2 * math.degrees(math.atan(SENSOR_MM / 2 / LENS_MM))   # horizontal = vertical (square images), ~49.1


def intrinsics(resolution: int, lens_mm: float = LENS_MM, sensor_mm: float = SENSOR_MM) -> np.ndarray:
    """Pinhole K (pixels) of a square image; principal point at the image centre."""
    f = lens_mm / sensor_mm * resolution
    return np.array([[f, 0.0, resolution / 2], [0.0, f, resolution / 2], [0.0, 0.0, 1.0]])


def camera_position(azimuth_deg: float, elevation_deg: float, distance: float) -> np.ndarray:
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return distance * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])


def c2w_blender(azimuth_deg: float, elevation_deg: float, distance: float) -> np.ndarray:
    """Camera-to-world 4x4 in Blender convention, looking at the origin with world +Z up."""
    eye = camera_position(azimuth_deg, elevation_deg, distance)
    back = eye / np.linalg.norm(eye)                   # camera +Z points away from the target
    up_world = np.array([0.0, 0.0, 1.0])
    if abs(back @ up_world) > 1 - 1e-9:                # straight above or below: pick any right axis
        up_world = np.array([0.0, 1.0, 0.0])
    right = np.cross(up_world, back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, eye
    return c2w


def c2w_opencv(azimuth_deg: float, elevation_deg: float, distance: float) -> np.ndarray:
    return c2w_blender(azimuth_deg, elevation_deg, distance) @ BLENDER_TO_OPENCV


def project(points: np.ndarray, K: np.ndarray, c2w_cv: np.ndarray) -> np.ndarray:
    """World points [N, 3] -> pixel coordinates [N, 2] (x right, y down) through OpenCV K, c2w."""
    w2c = np.linalg.inv(c2w_cv)
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    uv = cam @ K.T
    return uv[:, :2] / uv[:, 2:3]


def fixed_angles() -> list[tuple[float, float]]:
    """(azimuth, elevation) in degrees of the 16 fixed views."""
    return [(i * 360.0 / NUM_VIEWS, FIXED_ELEVATION) for i in range(NUM_VIEWS)]


def random_angles(rng: np.random.Generator) -> list[tuple[float, float]]:
    """(azimuth, elevation) of the 16 random views: the fixed azimuths, elevation ~ U[-10, 40]."""
    low, high = RANDOM_ELEVATION
    return [(i * 360.0 / NUM_VIEWS, float(rng.uniform(low, high))) for i in range(NUM_VIEWS)]


def seed_for(uid: str, base_seed: int = 0) -> int:
    """A stable 63-bit seed per object, independent of shard layout and machine."""
    from common.config import stable_seed
    return stable_seed(base_seed, uid)
