"""Pure pixel transforms shared by the CR/DX and CT/MR recipes: windowing to 8 bit, zero-padding to a
centred square (and mapping boxes on the square back to source pixels), resizing to the model input.

No DICOM here; these functions are unit-tested on synthetic arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class PadTransform:
    """How a source image was placed in the zero-padded square that the model saw.

    MedGemma 1.5 answers localisation prompts with boxes ``[y0, x0, y1, x1]`` on a 0-1000 grid over
    the *square* model input. The SR must reference pixels of the *source* image, so we keep the
    offsets needed to map back. Source coordinates are (row, column) in pixels, 0 at the top-left edge.
    Resizing the square (to 896) does not matter: the grid is relative to the square.
    """

    rows: int  #: source Rows
    columns: int  #: source Columns
    offset_y: int  #: zero rows added above the image
    offset_x: int  #: zero columns added left of the image
    square_size: int  #: side of the padded square, in source pixels

    @classmethod
    def for_shape(cls, rows: int, columns: int) -> "PadTransform":
        """Centre a rows x columns image in a square, splitting the padding evenly (extra pixel after)."""
        size = max(rows, columns)
        return cls(rows, columns, (size - rows) // 2, (size - columns) // 2, size)

    def grid_point_to_source(self, y: float, x: float, grid: float = 1000.0) -> tuple[float, float]:
        """Map a point on the 0..grid square grid to source (row, column), clipped to the image."""
        row = y / grid * self.square_size - self.offset_y
        col = x / grid * self.square_size - self.offset_x
        return (min(max(row, 0.0), float(self.rows)), min(max(col, 0.0), float(self.columns)))

    def grid_box_to_source(
        self, box: Sequence[float], grid: float = 1000.0
    ) -> tuple[float, float, float, float]:
        """Map a grid box ``[y0, x0, y1, x1]`` to source ``(row0, col0, row1, col1)``.

        Corners are put in order (row0 <= row1, col0 <= col1) and clipped to the image, so a box that
        lies wholly in the padding comes back with zero height or width; callers should drop those.
        """
        if len(box) != 4:
            raise ValueError(f"a box needs 4 numbers [y0, x0, y1, x1], got {len(box)}")
        y0, x0, y1, x1 = (float(v) for v in box)
        r0, c0 = self.grid_point_to_source(min(y0, y1), min(x0, x1), grid)
        r1, c1 = self.grid_point_to_source(max(y0, y1), max(x0, x1), grid)
        return (r0, c0, r1, c1)

    def source_box_to_grid(
        self, box: Sequence[float], grid: float = 1000.0
    ) -> tuple[float, float, float, float]:
        """Inverse of :meth:`grid_box_to_source` for boxes inside the image (for overlays and tests)."""
        r0, c0, r1, c1 = (float(v) for v in box)
        scale = grid / self.square_size
        return (
            (r0 + self.offset_y) * scale,
            (c0 + self.offset_x) * scale,
            (r1 + self.offset_y) * scale,
            (c1 + self.offset_x) * scale,
        )



def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and map linearly onto 0..255, rounding to the nearest level."""
    scaled = (np.clip(np.asarray(values, dtype=np.float32), low, high) - low) * (255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)


def pad_to_square(pixels: np.ndarray) -> tuple[np.ndarray, PadTransform]:
    """Zero-pad a (rows, cols) or (rows, cols, channels) array to a centred square."""
    rows, columns = pixels.shape[:2]
    transform = PadTransform.for_shape(rows, columns)
    if rows == columns:
        return pixels, transform
    size = transform.square_size
    out = np.zeros((size, size) + pixels.shape[2:], dtype=pixels.dtype)
    out[transform.offset_y : transform.offset_y + rows, transform.offset_x : transform.offset_x + columns] = pixels
    return out, transform


def _to_image(pixels: np.ndarray, image_size: int | None) -> Image.Image:
    """uint8 gray or RGB array -> RGB PIL image, resized like the Gemma 3 processor would (bilinear).

    Resizing here instead of in the processor gives the same pixels (both use PIL bilinear on uint8)
    and halves the processor's time for an 85-slice CT.
    """
    image = Image.fromarray(np.ascontiguousarray(pixels))  # uint8: "L" for 2-D, "RGB" for (rows, cols, 3)
    if image_size and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), resample=Image.Resampling.BILINEAR)
    return image.convert("RGB")
