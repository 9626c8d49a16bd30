"""The chart PNG writer: a standard PNG that decodes to exactly the drawn pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service_profiler.analyze.png import encode_png, write_png


def decode(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()  # verifies every chunk's CRC and the zlib stream
    assert image.mode == "RGB"
    return np.asarray(image)


def test_opaque_pixels_round_trip_exactly(tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (37, 53, 4), dtype=np.uint8)
    rgba[:, :, 3] = 255
    write_png(tmp_path / "x.png", rgba)
    assert np.array_equal(decode((tmp_path / "x.png").read_bytes()), rgba[:, :, :3])


def test_transparent_pixels_are_composited_over_white() -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)        # fully transparent: white
    rgba[0, 1] = (0, 0, 0, 255)      # opaque black stays black
    rgba[0, 2] = (200, 0, 0, 128)    # half red over white
    rgba[1, :] = (10, 20, 30, 255)
    out = decode(encode_png(rgba))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (0, 0, 0)
    assert tuple(out[0, 2]) == (227, 127, 127)
    assert (out[1] == (10, 20, 30)).all()


def test_a_rendered_chart_decodes_to_the_canvas_pixels() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1, 2], [2, 0, 1])
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())  # type: ignore[attr-defined]
    out = decode(encode_png(rgba))
    assert out.shape == (300, 400, 3)
    assert np.array_equal(out, rgba[:, :, :3])


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 4), np.float32)])
def test_other_shapes_and_types_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(bad)
