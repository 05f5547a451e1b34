"""Convert an original LDM-format checkpoint (MVDream, Isotropic3D, SD 2.1) into a checkpoint directory.

    python pipelines/convert_checkpoint.py --input sd-v2.1-base-4view.pt --output ckpt/mvdream \
        --clip-weights open_clip_vit_h14.bin          # MVDream: the image encoder comes from its own file
    python pipelines/convert_checkpoint.py --input isotropic3d.ckpt --output ckpt/isotropic3d
        # the image tower and the VAE are inside; featurisation defaults to isotropic3d-double-radians

.ckpt / .pt are read with torch.load(weights_only=True) (a file that needs pickle is refused);
.safetensors with safetensors. finetune.py --init and generate.py --checkpoint also take these files
directly and convert them once into $ISO3D_CACHE/converted (default ~/.cache/iso3d/converted).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without install

import common  # noqa: E402,F401  (before torch: see common/__init__.py)
from model.convert import ConversionError, convert  # noqa: E402
from model.mvmodel import FEATURIZATIONS  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, required=True, help=".ckpt | .pt | .safetensors in LDM layout")
    p.add_argument("--output", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--camera-featurization", choices=FEATURIZATIONS,
                   help="default: isotropic3d-double-radians if the file holds the image tower, else mvdream")
    p.add_argument("--clip-weights", help="OpenCLIP ViT-H-14 weights file for the image encoder (open_clip's loader)")
    args = p.parse_args(argv)
    try:
        if args.clip_weights and not Path(args.clip_weights).is_file():
            raise ConversionError(f"--clip-weights {args.clip_weights}: not a file")
        out = convert(args.input, args.output, args.camera_featurization, args.clip_weights)
    except ConversionError as e:
        print(f"convert_checkpoint.py: error: {e}", file=sys.stderr)
        return 2
    cfg = json.loads((out / "config.json").read_text())
    print(json.dumps({"output": str(out), "camera_featurization": cfg["camera_featurization"],
                      "inference": cfg["inference"], "vae_path": cfg["vae_path"],
                      "encoder_weights": cfg["encoder"]["weights"]}, indent=1))
    if cfg["vae_path"] is None:
        print("convert_checkpoint.py: note: the file holds no VAE; give model.vae_path=DIR (SD 2.1's vae/) when "
              "you use this checkpoint", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
