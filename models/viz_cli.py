"""Cluster heat-maps of a PaCa-ViT model over an image.

Usage::

    python -m tocalib.models.viz_cli IMAGE MODEL --out grid.png [--checkpoint PATH] [--size 224]
                             [--max-clusters 8] [--cell-size 128] [--seed 0]

Runs ``MODEL`` (a registered name, random weights unless ``--checkpoint`` gives an official-format
checkpoint; the model is built without its classifier, so a checkpoint fine-tuned onto any number of
classes loads) on ``IMAGE`` resized to ``--size`` (an int, or ``H,W``) and normalised with the ImageNet
mean/std, and writes a PNG grid: one row per clustered stage, the image first, then the heat-maps of
the first ``--max-clusters`` clusters of that stage's assignment over the image. The maps come from
``model.forward_features(x, return_assignments=True)``; rendering is :func:`tocalib.viz.render_grid`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np
import torch

from tocalib.models import create_model, list_models
from tocalib.viz import save_grid


def _size(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--size must be a positive int or H,W, got {text!r}")
    return (parts[0], parts[-1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tocalib.models.viz_cli", description=__doc__.split("\n")[0])
    parser.add_argument("image", help="input image file (any format Pillow reads)")
    parser.add_argument("model", help="registered model name, e.g. pacavit_tiny_p2cconv_100_0")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--checkpoint", default=None, help="official-format checkpoint (default: random weights)")
    parser.add_argument("--size", type=_size, default=(224, 224), help="input size, N or H,W (default 224)")
    parser.add_argument("--max-clusters", type=int, default=8, help="clusters shown per stage (default 8)")
    parser.add_argument("--cell-size", type=int, default=128, help="cell height in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    return parser


def stage_maps(model: torch.nn.Module, rgb: np.ndarray) -> list[torch.Tensor]:
    """The (M_i, H_i, W_i) assignment maps of every clustered stage for one (H, W, 3) uint8 image."""
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div(255)
    cfg = model.pretrained_cfg  # the normalisation the weights expect
    x = (x - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]
    with torch.inference_mode():
        _, assignments = model.eval().forward_features(x[None], return_assignments=True)
    return [a[0] for a in assignments if a is not None]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    from PIL import Image

    args = _parser().parse_args(argv)
    if args.model not in list_models("pacavit_*"):
        raise SystemExit(f"unknown PaCa-ViT model {args.model!r}; choose one of: {', '.join(list_models('pacavit_*'))}")
    for option, value in (("--max-clusters", args.max_clusters), ("--cell-size", args.cell_size)):
        if value < 1:
            raise SystemExit(f"{option} must be >= 1, got {value}")
    height, width = args.size
    try:  # before the model is built: a wrong path fails at once
        image = Image.open(args.image).convert("RGB")
    except FileNotFoundError:
        raise SystemExit(f"image file {args.image!r} does not exist; check the path") from None
    except (OSError, Image.UnidentifiedImageError) as err:
        raise SystemExit(f"{args.image!r} is not an image Pillow can read ({err}); pass a PNG, JPEG, …") from None
    rgb = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise SystemExit(f"checkpoint file {args.checkpoint!r} does not exist; check the path")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise SystemExit(f"--out {args.out!r}: {folder} is not a writable folder; create it or pass another --out")
    torch.manual_seed(args.seed)
    model = create_model(args.model, pretrained=args.checkpoint or False, num_classes=0)  # a classifier is unused
    maps = stage_maps(model, rgb)
    if not maps:
        raise SystemExit(f"{args.model} has no clustered stage (num_clusters is 0 everywhere)")
    save_grid(maps, args.out, image=rgb, max_maps=args.max_clusters, cell_size=args.cell_size)
    print(f"wrote {args.out}: {len(maps)} stages x up to {args.max_clusters} clusters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
