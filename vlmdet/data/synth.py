"""Synthetic product photos with EU-style nutrition tables, as a COCO dataset.

The smoke preset trains a tiny model on CPU, so the images are small (320x240 by default) and the
table is large (about 25-70% of the width): a model that small can learn where a dense block of
rows sits, not read it. What makes the data photo-like: packaging clutter that looks like text
(ingredients, barcode, logos), several fonts and sizes, borders or none, one or two value
columns, slight rotation and perspective, uneven light, blur, sensor noise and JPEG artefacts.
About 8% of images hold no table (the model must learn to answer "none") and about 10% hold two.

Deterministic: each image draws from its own RNG seeded by (seed, index), so the same seed gives
byte-identical files on the same Pillow/libjpeg and fonts (DejaVu is used when installed).
"""
from __future__ import annotations

import json
import math
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CATEGORY = "nutrition-table"
NO_TABLE_P = 0.08
TWO_TABLES_P = 0.10
DEJAVU_DIR = Path("/usr/share/fonts/truetype/dejavu")
TITLES = ["Nutrition declaration", "Nutrition information", "Typical values", "NUTRITION",
          "Nährwertangaben", "Valeurs nutritionnelles"]
INGREDIENTS = ("Ingredients: wheat flour, sugar, palm oil, cocoa powder, glucose syrup, whey powder "
               "(milk), salt, raising agents: sodium carbonates, emulsifier: soya lecithins, flavouring. "
               "May contain traces of nuts. Store in a cool dry place. Best before: see top.").split()
BRANDS = ["CRUNCHY", "Golden Oats", "BIO", "Choco", "Fresh!", "Muesli", "Snack Co", "Veggie"]


@lru_cache(maxsize=None)
def _font_names() -> tuple[str, ...]:
    names = ["default"]
    if DEJAVU_DIR.is_dir():
        names += [p.name for p in sorted(DEJAVU_DIR.glob("DejaVu*.ttf")) if "Bold" not in p.name]
    return tuple(names)


@lru_cache(maxsize=256)
def _font(name: str, size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if name != "default":
        path = DEJAVU_DIR / name
        bold_path = path.with_name(path.stem.split("-")[0] + "-Bold.ttf")
        return ImageFont.truetype(str(bold_path if bold and bold_path.exists() else path), size)
    return ImageFont.load_default(size=size)


def _luma(c: tuple[int, int, int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _colour(rng: random.Random, light: bool | None = None) -> tuple[int, int, int]:
    while True:
        c = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if light is None or (_luma(c) > 170) == light:
            return c


def _nutrition_rows(rng: random.Random, two_columns: bool) -> list[tuple[str, ...]]:
    fat = rng.uniform(0, 35)
    carb = rng.uniform(0, 80)
    protein = rng.uniform(0, 30)
    fibre = rng.uniform(0, 10)
    kj = 37 * fat + 17 * carb + 17 * protein + 8 * fibre
    comma = rng.random() < 0.5  # continental decimal comma

    def g(v: float) -> str:
        text = "<0.5 g" if v < 0.5 else f"{v:.1f} g"
        return text.replace(".", ",") if comma else text

    portion = rng.choice([25, 30, 40, 50])
    values = [("Energy", kj), ("Fat", fat), ("of which saturates", fat * rng.uniform(0.1, 0.7)),
              ("Carbohydrate", carb), ("of which sugars", carb * rng.uniform(0.05, 0.8)),
              ("Fibre", fibre), ("Protein", protein), ("Salt", rng.uniform(0, 3))]
    if rng.random() < 0.25:
        values.pop(5)  # fibre is optional in the EU declaration
    rows: list[tuple[str, ...]] = [("", "per 100 g", f"per {portion} g")]
    for name, v in values:
        if name == "Energy":
            cells = tuple(f"{round(x)} kJ / {round(x / 4.184)} kcal" for x in (v, v * portion / 100))
        else:
            cells = (g(v), g(v * portion / 100))
        rows.append((name, *cells))
    return [r if two_columns else r[:2] for r in rows]


def _layout(rows, font, title_font, title: str) -> tuple[list[int], int, int, int]:
    """Column widths, row height, title height and natural total width of a table."""
    cols = [max(int(math.ceil(font.getlength(r[i]))) for r in rows) for i in range(len(rows[0]))]
    asc, desc = font.getmetrics()
    row_h = asc + desc + 2
    t_asc, t_desc = title_font.getmetrics()
    title_h = t_asc + t_desc + 3
    width = max(sum(cols) + 6 * (len(cols) - 1), int(title_font.getlength(title))) + 8
    return cols, row_h, title_h, width


def _plan_table(rng: random.Random, size: tuple[int, int], alone: bool):
    """Choose font, content and size for one table; two tables get half the room each."""
    W, H = size
    font_name = rng.choice(_font_names())
    two_columns = alone and rng.random() < 0.4
    rows = _nutrition_rows(rng, two_columns)
    title = rng.choice(TITLES)
    target_w = rng.uniform(0.25, 0.7 if alone else 0.42) * W
    max_h = rng.uniform(0.45, 0.9) * H if alone else rng.uniform(0.35, 0.85) * H
    scale = H / 240  # font sizes were tuned at 240 px high
    for px in range(max(7, round(16 * scale)), 6, -1):
        font, title_font = _font(font_name, px), _font(font_name, px + 1, bold=True)
        cols, row_h, title_h, natural_w = _layout(rows, font, title_font, title)
        height = title_h + row_h * len(rows) + 8
        if natural_w <= target_w and height <= max_h:
            break
    width = int(min(max(natural_w, target_w), W - 8))  # wider than needed: labels left, values right
    return {"font": font, "title_font": title_font, "rows": rows, "title": title, "cols": cols,
            "row_h": row_h, "title_h": title_h, "w": width, "h": int(min(height, H - 8))}


def _draw_table(draw: ImageDraw.ImageDraw, rng: random.Random, plan: dict, x0: int, y0: int,
                package: tuple[int, int, int]) -> tuple[int, int, int, int]:
    w, h = plan["w"], plan["h"]
    bg = rng.choice([(255, 255, 255), _colour(rng, light=True), package])
    ink = (rng.randrange(60), rng.randrange(60), rng.randrange(60)) if _luma(bg) > 110 else (250, 250, 250)
    bordered = rng.random() < 0.7
    draw.rectangle([x0, y0, x0 + w, y0 + h], fill=bg, outline=ink if bordered else None,
                   width=rng.choice([1, 1, 2]))
    y = y0 + 3
    if rng.random() < 0.3:  # inverted title band
        draw.rectangle([x0, y0, x0 + w, y0 + plan["title_h"]], fill=ink)
        draw.text((x0 + 4, y), plan["title"], font=plan["title_font"], fill=bg)
    else:
        draw.text((x0 + 4, y), plan["title"], font=plan["title_font"], fill=ink)
    y = y0 + plan["title_h"]
    rules = rng.random() < 0.6
    value_cols = plan["cols"][1:]
    for row in plan["rows"]:
        if y + plan["row_h"] > y0 + h:
            break
        if rules:
            draw.line([x0 + 2, y, x0 + w - 2, y], fill=ink, width=1)
        draw.text((x0 + 4, y + 1), row[0], font=plan["font"], fill=ink)
        x = x0 + w - 4
        for text, cw in zip(reversed(row[1:]), reversed(value_cols)):
            draw.text((x - plan["font"].getlength(text), y + 1), text, font=plan["font"], fill=ink)
            x -= cw + 6
        y += plan["row_h"]
    return x0, y0, x0 + w, y0 + h


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int],
                  package: tuple[int, int, int]) -> None:
    """Text-like packaging that is not a nutrition table: the hard negatives."""
    W, H = size
    ink = (20, 20, 20) if _luma(package) > 110 else (240, 240, 240)
    for _ in range(rng.randint(0, 3)):  # coloured panels
        x, y = rng.randrange(W), rng.randrange(H)
        box = [x, y, x + rng.randrange(20, W // 2), y + rng.randrange(10, H // 3)]
        (draw.ellipse if rng.random() < 0.4 else draw.rectangle)(box, fill=_colour(rng))
    brand_font = _font(rng.choice(_font_names()), rng.randint(18, 34) * H // 240, bold=True)
    draw.text((rng.randrange(W // 2), rng.randrange(H // 2)), rng.choice(BRANDS), font=brand_font,
              fill=_colour(rng))
    small = _font(rng.choice(_font_names()), rng.randint(7, 10) * H // 240)
    x, y = rng.randrange(W // 2), rng.randrange(H)
    start = rng.randrange(len(INGREDIENTS) // 2)
    for line in range(rng.randint(2, 7)):  # an ingredients paragraph
        words = INGREDIENTS[start + line * 4: start + line * 4 + rng.randint(4, 7)]
        draw.text((x, y + line * small.size * 1.2), " ".join(words), font=small, fill=ink)
    if rng.random() < 0.6:  # barcode
        bx, by = rng.randrange(W - 60), rng.randrange(H - 40)
        bw, bh = rng.randint(40, 70), rng.randint(25, 40)
        draw.rectangle([bx, by, bx + bw, by + bh], fill=(255, 255, 255))
        x = bx + 3
        while x < bx + bw - 3:
            bar = rng.choice([1, 1, 2, 3])
            draw.rectangle([x, by + 3, x + bar - 1, by + bh - 9], fill=(0, 0, 0))
            x += bar + rng.choice([1, 2, 2, 3])
        draw.text((bx + 3, by + bh - 9), "".join(str(rng.randrange(10)) for _ in range(13)),
                  font=_font("default", 7), fill=(0, 0, 0))
    for _ in range(rng.randint(0, 2)):  # round logos with a few letters
        r = rng.randint(8, 22)
        cx, cy = rng.randrange(r, W - r), rng.randrange(r, H - r)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_colour(rng), outline=ink)
        draw.text((cx - r // 2, cy - 4), rng.choice(["BIO", "EU", "V", "e", "GF"]), font=small, fill=ink)


def _place(rng: random.Random, size: tuple[int, int], plans: list[dict]) -> list[tuple[int, int]]:
    """Top-left corners for the tables: two go side by side or stacked, never overlapping."""
    W, H = size
    if not plans:
        return []
    if len(plans) == 1:
        p = plans[0]
        return [(rng.randint(4, max(4, W - p["w"] - 4)), rng.randint(4, max(4, H - p["h"] - 4)))]
    a, b = plans
    if a["w"] + b["w"] + 12 <= W:  # side by side: a's right edge leaves room for b
        xa = rng.randint(4, W - a["w"] - b["w"] - 8)
        xb = rng.randint(xa + a["w"] + 4, W - b["w"] - 4)
        return [(xa, rng.randint(4, max(4, H - a["h"] - 4))), (xb, rng.randint(4, max(4, H - b["h"] - 4)))]
    if a["h"] + b["h"] + 12 <= H:  # stacked
        ya = rng.randint(4, H - a["h"] - b["h"] - 8)
        yb = rng.randint(ya + a["h"] + 4, H - b["h"] - 4)
        return [(rng.randint(4, max(4, W - a["w"] - 4)), ya), (rng.randint(4, max(4, W - b["w"] - 4)), yb)]
    return _place(rng, size, plans[:1])


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 matrix mapping the 4 src points onto the 4 dst points."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    h = np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def _warp(rng: random.Random, im: Image.Image, boxes: list[tuple[int, int, int, int]]):
    """Slight rotation and perspective, as a hand-held photo; boxes become the AABB of their corners."""
    W, H = im.size
    src = np.array([[0, 0], [W, 0], [W, H], [0, H]], dtype=np.float64)
    angle = math.radians(rng.uniform(-5, 5))
    scale = rng.uniform(0.88, 1.0)
    centre = np.array([W / 2, H / 2])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    jitter = np.array([[rng.uniform(-0.04, 0.04) * W, rng.uniform(-0.04, 0.04) * H] for _ in range(4)])
    dst = (src - centre) @ rot.T * scale + centre + jitter
    fwd = _homography(src, dst)
    inv = np.linalg.inv(fwd)
    inv /= inv[2, 2]
    out = im.transform(im.size, Image.Transform.PERSPECTIVE, tuple(inv.flatten()[:8]),
                       resample=Image.Resampling.BILINEAR, fillcolor=_colour(rng))
    warped = []
    for x1, y1, x2, y2 in boxes:
        pts = np.array([[x1, y1, 1], [x2, y1, 1], [x2, y2, 1], [x1, y2, 1]], dtype=np.float64) @ fwd.T
        xs, ys = pts[:, 0] / pts[:, 2], pts[:, 1] / pts[:, 2]
        warped.append((max(0.0, xs.min()), max(0.0, ys.min()), min(float(W), xs.max()), min(float(H), ys.max())))
    return out, warped


def _photo(rng: random.Random, nrng: np.random.Generator, im: Image.Image) -> Image.Image:
    """Uneven light, a little blur and sensor noise."""
    W, H = im.size
    arr = np.asarray(im, dtype=np.float32)
    gx, gy = np.meshgrid(np.linspace(-1, 1, W, dtype=np.float32), np.linspace(-1, 1, H, dtype=np.float32))
    light = 1.0 + rng.uniform(-0.2, 0.2) * gx + rng.uniform(-0.2, 0.2) * gy + rng.uniform(-0.1, 0.05)
    arr = arr * light[..., None] + nrng.normal(0, rng.uniform(0, 6), arr.shape).astype(np.float32)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    radius = rng.choice([0, 0, 0.4, 0.7])
    return out.filter(ImageFilter.GaussianBlur(radius)) if radius else out


def render(seed: int, index: int, size: tuple[int, int] = (320, 240)) -> tuple[Image.Image, list[list[float]]]:
    """One synthetic photo and its table boxes (xyxy pixels); a pure function of (seed, index, size)."""
    rng = random.Random(f"vlmdet-synth:{seed}:{index}")
    nrng = np.random.default_rng([seed, index])
    W, H = size
    package = _colour(rng)
    im = Image.new("RGB", size, package)
    draw = ImageDraw.Draw(im)
    _draw_clutter(draw, rng, size, package)
    u = rng.random()
    count = 0 if u < NO_TABLE_P else 2 if u < NO_TABLE_P + TWO_TABLES_P else 1
    plans = [_plan_table(rng, size, alone=count == 1) for _ in range(count)]
    boxes = [_draw_table(draw, rng, plan, x, y, package) for plan, (x, y) in zip(plans, _place(rng, size, plans))]
    if rng.random() < 0.8:
        im, boxes = _warp(rng, im, boxes)
    return _photo(rng, nrng, im), [[round(float(v), 2) for v in b] for b in boxes]


def generate(out_dir: str | Path, num: int, seed: int = 0, size: tuple[int, int] = (320, 240)) -> Path:
    """Write `num` images to out_dir/images and out_dir/annotations.json (COCO); return the json path."""
    if num < 1:
        raise ValueError(f"num={num}: ask for at least one synthetic image (e.g. synth:240).")
    width, height = (int(v) for v in size)
    if width < 64 or height < 64:
        raise ValueError(f"size={tuple(size)}: synthetic images need at least 64x64 pixels to hold a table.")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num):
        im, boxes = render(seed, i, (width, height))
        rng = random.Random(f"vlmdet-jpeg:{seed}:{i}")
        name = f"images/{i:06d}.jpg"
        im.save(out_dir / name, "JPEG", quality=rng.randint(55, 92))
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for x1, y1, x2, y2 in boxes:
            w, h = round(x2 - x1, 2), round(y2 - y1, 2)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                "bbox": [x1, y1, w, h], "area": round(w * h, 2), "iscrowd": 0})
    coco = {"info": {"description": "vlmdet synthetic nutrition tables", "seed": seed, "size": [width, height]},
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": CATEGORY, "supercategory": "none"}]}
    path = out_dir / "annotations.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco))
    tmp.replace(path)  # written last and atomically: its presence means the images are complete
    return path
