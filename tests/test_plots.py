"""loss.png: a real PNG that a viewer can decode, with train and eval curves drawn."""

from __future__ import annotations

import math
import struct

from daemon.trainer.plots import plot_loss


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def decode(path):
    from matplotlib.image import imread

    return imread(path)


def test_plot_loss_writes_a_decodable_png_with_both_curves(root):
    train = [[s, 3.0 * math.exp(-s / 40) + 0.2] for s in range(1, 201)]
    evals = [[s, 3.0 * math.exp(-s / 40) + 0.3] for s in range(0, 201, 50)]
    out = plot_loss(train, evals, root / "loss.png", "default job 7")
    assert out == root / "loss.png"
    assert png_size(out.read_bytes()) == (800, 450)
    img = decode(out)
    assert img.shape[:2] == (450, 800)
    # Both line colours are on the canvas: matplotlib's tab:blue (train) and tab:orange (eval).
    rgb = (img[..., :3] * 255).round().astype(int).reshape(-1, 3).tolist()
    colours = {tuple(c) for c in rgb}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_plot_loss_accepts_dicts_skips_nan_and_handles_no_points(root):
    plot_loss([{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 1.5}],
              [{"step": 3, "eval_loss": 1.7}], root / "a.png", "dicts")
    assert png_size((root / "a.png").read_bytes()) == (800, 450)
    plot_loss([], [], root / "empty.png", "nothing yet")
    assert decode(root / "empty.png").shape[:2] == (450, 800)
