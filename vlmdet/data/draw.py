"""Pictures people would rather look at than read: boxes drawn on images, a grid of them."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlmdet.formats import Box

PRED = (230, 40, 40)
TRUTH = (30, 170, 60)


def draw(image: Image.Image, boxes: list[Box], truth: list[Box] | None = None) -> Image.Image:
    """A copy of `image` with ground truth in green and predictions in red with their scores."""
    img = image.convert("RGB").copy()
    d = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 300))
    font = ImageFont.load_default(size=max(10, round(max(img.size) / 40)))
    for b in truth or []:
        d.rectangle([b.x1, b.y1, b.x2, b.y2], outline=TRUTH, width=width)
    for b in boxes:
        d.rectangle([b.x1, b.y1, b.x2, b.y2], outline=PRED, width=width)
        if b.score is not None:
            label = f"{b.score:.2f}"
            x, y = b.x1, max(0, b.y1 - font.size - 2)
            d.rectangle(d.textbbox((x, y), label, font=font), fill=PRED)
            d.text((x, y), label, fill="white", font=font)
    return img


def grid(images: list[Image.Image], path: str | Path, cell: int = 256, cols: int = 4) -> str | None:
    """Tile images (each fitted into cell x cell) into one PNG."""
    if not images:
        return None
    cols = min(cols, len(images))
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * cell), "white")
    for i, im in enumerate(images):
        im = im.copy()
        im.thumbnail((cell - 4, cell - 4))
        x, y = (i % cols) * cell + (cell - im.width) // 2, (i // cols) * cell + (cell - im.height) // 2
        sheet.paste(im, (x, y))
    sheet.save(path)
    return str(Path(path).resolve())
