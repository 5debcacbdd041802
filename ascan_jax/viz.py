"""Pictures for people: image grids with a caption under each image, and PNG files.

``captioned_grid`` lays out equally sized images in rows, writes each caption (wrapped to the
cell's width, PIL's bundled font) below its image, and returns one uint8 RGB image; the
text-to-image task uses it for sample grids, the digit-scenes tool for its dataset preview.
``save_png`` writes a uint8 image, locally through a temporary file and a rename (never half a
file), remotely (``gs://...``) through etils' epath, which ``fileio`` is built on.
"""
from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ascan_jax import fileio


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without FreeType: the fixed bitmap font.
    return ImageFont.load_default()


def _text_width(font, text: str) -> float:
  return font.getlength(text) if hasattr(font, "getlength") else font.getbbox(text)[2]


def wrap_text(text: str, font, width: int) -> list[str]:
  """Greedy word wrap to ``width`` pixels; a word longer than a line is cut by characters."""
  lines: list[str] = []
  if not str(text).strip():
    return lines
  for paragraph in str(text).split("\n"):
    line = ""
    for word in paragraph.split(" "):
      candidate = f"{line} {word}" if line else word
      if _text_width(font, candidate) <= width:
        line = candidate
        continue
      if line:
        lines.append(line)
      while _text_width(font, word) > width and len(word) > 1:
        cut = len(word)
        while cut > 1 and _text_width(font, word[:cut]) > width:
          cut -= 1
        lines.append(word[:cut])
        word = word[cut:]
      line = word
    lines.append(line)
  return lines


def captioned_grid(images, captions: Sequence[str], columns: int, *, scale: int = 1,
                   font_size: int = 11, padding: int = 4, background: int = 255,
                   text_color: tuple[int, int, int] = (0, 0, 0),
                   max_lines: int | None = None) -> np.ndarray:
  """uint8 [H', W', 3]: ``images`` (uint8 [N, H, W, C], C 1 or 3) in ``columns`` columns.

  Each image is enlarged ``scale`` times (nearest neighbour) and its caption, wrapped to the
  cell's width, is written under it; each row is as tall as its longest caption
  (``max_lines`` cuts longer ones, ending with '...').
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
    raise ValueError(f"captioned_grid expects uint8 images [N, H, W, 1|3], got {images.dtype} "
                     f"{images.shape}")
  if len(captions) != len(images):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  if columns < 1 or scale < 1:
    raise ValueError(f"columns and scale must be >= 1, got {columns} and {scale}")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  n, h, w = images.shape[:3]
  font = _font(font_size)
  ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (font_size, 2)
  line_height = ascent + descent + 1
  wrapped = [wrap_text(c, font, w) for c in captions]
  if max_lines is not None:
    wrapped = [lines if len(lines) <= max_lines else lines[:max_lines - 1] +
               [lines[max_lines - 1] + "..."] for lines in wrapped]
  rows = -(-n // columns)
  row_text = [max((len(wrapped[i]) for i in range(r * columns, min(n, (r + 1) * columns))),
                  default=0) * line_height for r in range(rows)]
  cols = min(columns, n)
  total_h = padding + sum(h + t + padding * 2 for t in row_text)
  total_w = padding + cols * (w + padding)
  canvas = Image.new("RGB", (total_w, total_h), (background,) * 3)
  draw = ImageDraw.Draw(canvas)
  y = padding
  for r in range(rows):
    for c in range(cols):
      i = r * columns + c
      if i >= n:
        break
      x = padding + c * (w + padding)
      canvas.paste(Image.fromarray(images[i]), (x, y))
      for k, line in enumerate(wrapped[i]):
        draw.text((x, y + h + padding // 2 + k * line_height), line, fill=text_color, font=font)
    y += h + row_text[r] + padding * 2
  return np.asarray(canvas, np.uint8)


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W] or [H, W, 3|4] image as PNG (folders are created)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError(f"save_png expects a uint8 [H, W(, C)] image, got {image.dtype} "
                     f"{image.shape} for {path}")
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  folder = os.path.dirname(str(path))
  if folder:
    fileio.makedirs(folder)
  if fileio.is_remote(path):
    from etils import epath
    epath.Path(path).write_bytes(buffer.getvalue())
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(buffer.getvalue())
  os.replace(tmp, path)
