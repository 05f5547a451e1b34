"""Photo-like test images and a tiny segmenter the tests build themselves (no download).

    photo, mask = photo_like(400, 300)         # a red object on a textured green-blue wall and floor, its true mask
    colour_segmenter(tmp_path / "seg.onnx")    # an ONNX model in u2net's interface that finds red things

The segmenter is a real ONNX graph (1x1 convolution + sigmoid, built with the `onnx` package) that rembg loads
through its custom-model session exactly as it loads u2net.onnx: input [1, 3, 320, 320] normalised with
ImageNet's mean and std, output [1, 1, 320, 320] whose first channel is the mask.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # rembg's u2net normalisation


def photo_like(width: int, height: int, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """An RGB 'photo': a red ellipse-and-box object off centre on a noisy, striped green-blue background
    (a wall above a darker floor). Returns it and the object's true mask (bool [H, W])."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    wall = np.stack([40 + 20 * np.sin(x / 7.0), 120 + 40 * np.sin(y / 11.0), 170 + 30 * np.cos(x / 13.0)], -1)
    floor = np.stack([30 + 0 * x, 90 + 25 * np.sin((x + y) / 5.0), 110 + 0 * x], -1)
    bg = np.where((y > 0.7 * height)[..., None], floor, wall) + rng.normal(0, 12, (height, width, 3))
    mask_img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask_img)
    cx, cy = int(0.38 * width), int(0.55 * height)
    draw.ellipse((cx - 0.16 * width, cy - 0.25 * height, cx + 0.16 * width, cy + 0.12 * height), fill=255)
    draw.rectangle((cx - 0.08 * width, cy, cx + 0.08 * width, cy + 0.3 * height), fill=255)
    mask = np.asarray(mask_img) > 127
    obj = np.stack([200 + 30 * np.sin(y / 9.0), 40 + 15 * np.cos(x / 6.0), 35 + 0 * x], -1) + rng.normal(0, 8, (height, width, 3))
    rgb = np.where(mask[..., None], obj, bg)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB"), mask


def colour_segmenter(path: Path) -> Path:
    """Writes the ONNX model: mask = sigmoid(k * (r - (g + b) / 2 - 0.25)) in [0, 1] colour units, undoing rembg's
    normalisation ((v / max - mean) / std) inside the convolution's weights."""
    import onnx
    from onnx import TensorProto, helper
    k, threshold = 20.0, 0.25
    coef = np.array([1.0, -0.5, -0.5])
    weight = (k * coef * np.array(STD)).astype(np.float32).reshape(1, 3, 1, 1)
    bias = np.array([k * (float(coef @ np.array(MEAN)) - threshold)], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "weight", "bias"], ["score"]), helper.make_node("Sigmoid", ["score"], ["mask"])],
        "colour_segmenter",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 320, 320])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 320, 320])],
        [helper.make_tensor("weight", TensorProto.FLOAT, weight.shape, weight.ravel()),
         helper.make_tensor("bias", TensorProto.FLOAT, bias.shape, bias)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)
