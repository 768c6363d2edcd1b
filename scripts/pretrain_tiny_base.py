"""Pretrain the tiny Qwen2-VL base that the smoke preset fine-tunes (vlmdet/assets/tiny-qwen2-vl-grounding).

A tiny model from random weights learns no grounding in CPU minutes, so the project ships a base
pretrained once on a GPU on a GENERIC synthetic grounding task: cluttered 320x240 images holding
tables, barcodes, logos, text blocks, QR codes and coloured shapes; each query names one kind and
the answer lists every box of that kind in Qwen2-VL's format (0-1000), or "None". Nutrition tables
are never shown: the smoke fine-tune has to teach that label and look.

    # GPU, once (docs/tiny-base.md has the numbers of the committed run):
    python scripts/pretrain_tiny_base.py train --out OUT --steps 4000 --batch 128 --budget 420
    # CPU: load the base, LoRA fine-tune on nutrition tables, base vs fine-tuned recall/mAP50:
    python scripts/pretrain_tiny_base.py check --base vlmdet/assets/tiny-qwen2-vl-grounding --seconds 120
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from vlmdet.formats.base import Box
from vlmdet.formats.qwen2_vl import Qwen2VLFormat
from vlmdet.modeling.load import SAFE, check_safe_weights

W, H = 320, 240
# 320x240 -> smart_resize -> 308x252: an 18x22 grid of 14 px patches, 99 tokens after the 2x2 merge.
MIN_PIXELS, MAX_PIXELS = 64 * 28 * 28, 256 * 28 * 28
LABELS = ["table", "barcode", "logo", "text block", "qr code", "circle", "triangle"]
# Tables are the skill the fine-tune builds on, so they are asked for most often.
LABEL_WEIGHTS = [0.34, 0.11, 0.11, 0.11, 0.11, 0.11, 0.11]
FMT = Qwen2VLFormat()
WORDS = ("Item Total Price Qty Size Model Weight Code Date Value Type Rate Part Unit Batch Store Colour "
         "Length Width Height Serial Order Ref Net Gross Time Speed Power Volume Grade Lot Origin").split()

_FONTS: dict[int, ImageFont.ImageFont] = {}


def font(size: int):
    if size not in _FONTS:
        try:  # Pillow >= 10.1 with FreeType: a scalable font ships inside Pillow itself
            _FONTS[size] = ImageFont.load_default(size=size)
        except TypeError:
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def _rgb(r: random.Random, lo: int = 0, hi: int = 255):
    return tuple(r.randint(lo, hi) for _ in range(3))


def _word(r: random.Random) -> str:
    k = r.random()
    if k < 0.5:
        return r.choice(WORDS)
    if k < 0.8:
        return f"{r.randint(0, 999)}{r.choice(['', '.5', ' g', ' kg', ' mm', '%', ' ml'])}"
    return "".join(r.choice("ABCDEFGHKLMNPRSTUVXZ0123456789") for _ in range(r.randint(3, 8)))


# --- generic objects: each draws inside (x, y, w, h) and returns its tight box --------------------

def draw_table(img, d, r, x, y, w, h, ink, paper):
    fs = r.randint(6, 11)
    row_h = fs + r.randint(2, 6)
    title = r.random() < 0.5  # a title bar over the rows, as many printed tables have
    th = fs + 6 if title else 0
    rows = max(2, (h - th) // row_h)
    h = rows * row_h + 2 + th
    if r.random() < 0.7:
        d.rectangle([x, y, x + w, y + h], fill=paper)
    if title:
        filled = r.random() < 0.5
        if filled:
            d.rectangle([x, y, x + w, y + th], fill=ink)
        d.text((x + 3, y + 2), " ".join(r.choice(WORDS) for _ in range(r.randint(1, 2))).upper(),
               fill=paper if filled else ink, font=font(fs + 2))
        d.line([x, y + th, x + w, y + th], fill=ink, width=r.choice([1, 2]))
        y0 = y
        y = y + th
    border = r.random() < 0.65
    if border:
        d.rectangle([x, y, x + w, y + h], outline=ink, width=r.choice([1, 1, 2]))
    ncol = r.choice([2, 2, 3])
    cols = [x + int(w * c) for c in ([0, 0.55] if ncol == 2 else [0, 0.45, 0.72])]
    rules = r.choice(["all", "all", "header", "none"])
    vrules = border and r.random() < 0.5
    for i in range(rows):
        ty = y + 2 + i * row_h
        header = i == 0 and r.random() < 0.6
        if header and r.random() < 0.5:
            d.rectangle([x + 1, ty - 1, x + w - 1, ty + row_h - 2], fill=_rgb(r, 150, 230))
        for j, cx in enumerate(cols):
            d.text((cx + 3, ty + 1), _word(r) if j or not header else r.choice(WORDS), fill=ink, font=font(fs))
        if rules == "all" or (rules == "header" and i == 0):
            if i < rows - 1 or not border:
                d.line([x, ty + row_h - 2, x + w, ty + row_h - 2], fill=ink, width=1)
    if vrules:
        for cx in cols[1:]:
            d.line([cx, y, cx, y0 + h if title else y + h], fill=ink, width=1)
    if title:
        y = y0
    return x, y, x + w, y + h


def draw_barcode(img, d, r, x, y, w, h, ink, paper):
    d.rectangle([x, y, x + w, y + h], fill=(255, 255, 255))
    digits = r.random() < 0.7
    bh = h - (10 if digits else 2)
    cx = x + 3
    while cx < x + w - 4:
        bw = r.choice([1, 1, 2, 3])
        if r.random() < 0.55:
            d.rectangle([cx, y + 2, cx + bw - 1, y + bh], fill=(0, 0, 0))
        cx += bw
    if digits:
        d.text((x + 4, y + bh + 1), "".join(str(r.randint(0, 9)) for _ in range(max(4, w // 7))), fill=(0, 0, 0), font=font(8))
    return x, y, x + w, y + h


def draw_logo(img, d, r, x, y, w, h, ink, paper):
    col = _rgb(r, 0, 220)
    k = r.random()
    if k < 0.4:
        d.ellipse([x, y, x + w, y + h], fill=col, outline=_rgb(r), width=2)
    elif k < 0.7:
        d.rounded_rectangle([x, y, x + w, y + h], radius=min(w, h) // 4, fill=col)
    else:
        cx, cy, rad = x + w / 2, y + h / 2, min(w, h) / 2
        pts = [(cx + rad * (1 if i % 2 == 0 else 0.5) * math.cos(math.pi * i / 6),
                cy + rad * (1 if i % 2 == 0 else 0.5) * math.sin(math.pi * i / 6)) for i in range(12)]
        d.polygon(pts, fill=col)
    txt = "".join(r.choice("ABCDEFGHKMNPRSTWXZ") for _ in range(r.randint(1, 3)))
    fs = max(8, min(w, h) // 3)
    tw = d.textlength(txt, font=font(fs))
    d.text((x + (w - tw) / 2, y + h / 2 - fs / 2 - 1), txt, fill=_rgb(r, 200, 255) if sum(col) < 380 else (0, 0, 0), font=font(fs))
    return x, y, x + w, y + h


def draw_text_block(img, d, r, x, y, w, h, ink, paper):
    fs = r.randint(7, 11)
    lh = fs + r.randint(1, 4)
    n = max(3, h // lh)
    right = x
    for i in range(n):
        line, tw = "", 0.0
        target = w * (r.uniform(0.5, 0.8) if i == n - 1 else r.uniform(0.85, 1.0))
        while True:
            cand = (line + " " + r.choice(WORDS).lower()).strip()
            ctw = d.textlength(cand, font=font(fs))
            if ctw > target:
                break
            line, tw = cand, ctw
        d.text((x, y + i * lh), line, fill=ink, font=font(fs))
        right = max(right, x + tw)
    return x, y, int(right) + 1, y + n * lh


def draw_qr(img, d, r, x, y, w, h, ink, paper):
    s = min(w, h)
    n = r.choice([13, 17, 21])
    c = s / n
    d.rectangle([x, y, x + s, y + s], fill=(255, 255, 255))
    for i in range(n):
        for j in range(n):
            corner = (i < 4 and j < 4) or (i < 4 and j >= n - 4) or (i >= n - 4 and j < 4)
            on = (max(abs(i - (1.5 if i < 4 else n - 2.5)), abs(j - (1.5 if j < 4 else n - 2.5))) != 1) if corner else r.random() < 0.5
            if on:
                d.rectangle([x + j * c, y + i * c, x + (j + 1) * c - 1, y + (i + 1) * c - 1], fill=(0, 0, 0))
    return x, y, x + s, y + s


def draw_circle(img, d, r, x, y, w, h, ink, paper):
    s = min(w, h)
    d.ellipse([x, y, x + s, y + s], fill=_rgb(r), outline=_rgb(r) if r.random() < 0.3 else None)
    return x, y, x + s, y + s


def draw_triangle(img, d, r, x, y, w, h, ink, paper):
    apex = x + r.uniform(0.2, 0.8) * w
    d.polygon([(apex, y), (x, y + h), (x + w, y + h)], fill=_rgb(r))
    return x, y, x + w, y + h


DRAW = {"table": draw_table, "barcode": draw_barcode, "logo": draw_logo, "text block": draw_text_block,
        "qr code": draw_qr, "circle": draw_circle, "triangle": draw_triangle}
SIZE_RANGE = {"table": ((70, 190), (45, 170)), "barcode": ((45, 110), (28, 60)), "logo": ((24, 70), (24, 70)),
              "text block": ((60, 160), (28, 90)), "qr code": ((26, 60), (26, 60)), "circle": ((14, 60), (14, 60)),
              "triangle": ((16, 60), (14, 55))}


def background(r: random.Random) -> Image.Image:
    base = np.array(_rgb(r, 40, 255), dtype=np.float32)
    k = r.random()
    if k < 0.4:
        img = np.broadcast_to(base, (H, W, 3)).copy()
    elif k < 0.75:  # gradient, as on printed packaging
        other = np.array(_rgb(r, 40, 255), dtype=np.float32)
        t = np.linspace(0, 1, W if r.random() < 0.5 else H, dtype=np.float32)
        t = t[None, :, None] if t.size == W else t[:, None, None]
        img = base + (other - base) * t * np.ones((H, W, 1), np.float32)
    else:  # low-frequency blotches
        small = np.clip(base + np.random.default_rng(r.randint(0, 2**31)).uniform(-35, 35, (4, 5, 3)), 0, 255)
        img = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((W, H), Image.BICUBIC), np.float32)
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if r.random() < 0.5:  # a packaging panel filling most of the frame, as on product photos
        x0, y0, x1, y1 = r.randint(-20, 60), r.randint(-20, 50), r.randint(W - 60, W + 20), r.randint(H - 50, H + 20)
        j = lambda: r.randint(-12, 12)  # noqa: E731
        ImageDraw.Draw(img).polygon([(x0 + j(), y0 + j()), (x1 + j(), y0 + j()), (x1 + j(), y1 + j()), (x0 + j(), y1 + j())],
                                    fill=_rgb(r, 30, 255))
    return img


def _free(boxes, b, pad=4):
    return all(b[2] + pad <= o[0] or o[2] + pad <= b[0] or b[3] + pad <= o[1] or o[3] + pad <= b[1] for o in boxes)


def _place(r, kind, taken):
    (w0, w1), (h0, h1) = SIZE_RANGE[kind]
    for _ in range(30):
        w, h = r.randint(w0, w1), r.randint(h0, h1)
        if w >= W - 6 or h >= H - 6:
            continue
        x, y = r.randint(2, W - w - 3), r.randint(2, H - h - 3)
        if _free(taken, (x, y, x + w, y + h)):
            return x, y, w, h
    return None


def clutter(d, r, taken, n):
    for _ in range(n):  # single short lines of words and rules: not a labelled kind
        fs = r.randint(7, 12)
        txt = " ".join(_word(r) for _ in range(r.randint(1, 3)))
        tw = int(d.textlength(txt, font=font(fs))) + 1
        x, y = r.randint(0, max(0, W - tw)), r.randint(0, H - fs - 2)
        if _free(taken, (x, y, x + tw, y + fs + 2), pad=2):
            d.text((x, y), txt, fill=_rgb(r, 0, 140), font=font(fs))
            taken.append((x, y, x + tw, y + fs + 2))


def augment(img: Image.Image, r: random.Random, boxes: list[tuple]) -> tuple[Image.Image, list[tuple]]:
    if r.random() < 0.3:  # slight rotation; boxes become the hull of the rotated corners
        a = r.uniform(-4, 4)
        img = img.rotate(a, resample=Image.BILINEAR, fillcolor=_rgb(r, 60, 255))
        c, s, cx, cy = math.cos(math.radians(-a)), math.sin(math.radians(-a)), W / 2, H / 2
        out = []
        for b in boxes:
            pts = [((px - cx) * c - (py - cy) * s + cx, (px - cx) * s + (py - cy) * c + cy)
                   for px, py in ((b[0], b[1]), (b[2], b[1]), (b[0], b[3]), (b[2], b[3]))]
            out.append((max(0, min(p[0] for p in pts)), max(0, min(p[1] for p in pts)),
                        min(W, max(p[0] for p in pts)), min(H, max(p[1] for p in pts))))
        boxes = out
    arr = np.asarray(img, dtype=np.float32)
    if r.random() < 0.5:
        arr = arr * r.uniform(0.75, 1.15) + r.uniform(-20, 20)
    if r.random() < 0.3:
        arr = arr + np.random.default_rng(r.randint(0, 2**31)).normal(0, r.uniform(2, 10), arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if r.random() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(r.uniform(0.3, 1.0)))
    if r.random() < 0.3:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=r.randint(25, 85))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img, boxes


def generic_sample(seed: int) -> tuple[Image.Image, str, list[tuple]]:
    """One pretraining example: (image, queried label, boxes of that label in pixels, reading order)."""
    r = random.Random(seed)
    label = r.choices(LABELS, LABEL_WEIGHTS)[0]
    n_target = r.choices([0, 1, 2, 3], [0.13, 0.64, 0.19, 0.04])[0]
    others = [k for k in LABELS if k != label]
    kinds = [label] * n_target + [r.choice(others) for _ in range(r.randint(0 if n_target else 1, 4))]
    r.shuffle(kinds)
    img = background(r)
    d = ImageDraw.Draw(img)
    taken, target = [], []
    dark = r.random() < 0.8
    for kind in sorted(kinds, key=lambda k: k != "table"):  # big tables first: they are hardest to fit
        spot = _place(r, kind, taken)
        if spot is None:
            continue
        ink = _rgb(r, 0, 70) if dark else _rgb(r, 200, 255)
        paper = _rgb(r, 215, 255) if dark else _rgb(r, 0, 60)
        b = DRAW[kind](img, d, r, *spot, ink, paper)
        taken.append(b)
        if kind == label:
            target.append(b)
    clutter(d, r, taken, r.randint(0, 8))
    img, target = augment(img, r, target)
    target.sort(key=lambda b: (round(b[1] / 8), b[0]))
    return img, label, target


# --- exact Qwen2-VL pixel path, batched on the GPU -------------------------------------------------

def patchify(images: torch.Tensor, ip) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, H, W, 3] -> (pixel_values [B*h*w, 3*2*14*14], image_grid_thw [B, 3]) as Qwen2VLImageProcessor
    makes them: bicubic antialiased uint8 resize to the smart_resize size, fused rescale+normalise, then
    the (merge-block, channel, temporal, 14, 14) patch order with the frame repeated for temporal 2."""
    from torchvision.transforms.v2 import functional as tvF
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    x = images.permute(0, 3, 1, 2)
    rh, rw = smart_resize(x.shape[2], x.shape[3], factor=p * m, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    x = tvF.resize(x, [rh, rw], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    mean = torch.tensor(ip.image_mean, device=x.device) * (1.0 / ip.rescale_factor)
    std = torch.tensor(ip.image_std, device=x.device) * (1.0 / ip.rescale_factor)
    x = tvF.normalize(x.to(torch.float32), mean.tolist(), std.tolist())
    b, c, gh, gw = x.shape[0], x.shape[1], rh // p, rw // p
    x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1).reshape(b * gh * gw, c * t * p * p)
    thw = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=x.device)
    return x, thw


def verify_patchify(processor, n: int = 4) -> float:
    """Max |ours - processor| on a few generated images; the pretraining data must match the pipeline's."""
    imgs = [generic_sample(10**9 + i)[0] for i in range(n)]
    ref = processor.image_processor(images=imgs, return_tensors="pt")
    ours, thw = patchify(torch.from_numpy(np.stack([np.asarray(i) for i in imgs])), processor.image_processor)
    if not torch.equal(thw, ref["image_grid_thw"]):
        raise RuntimeError(f"grid mismatch: ours {thw.tolist()} vs processor {ref['image_grid_thw'].tolist()}")
    return float((ours - ref["pixel_values"]).abs().max())


# --- GPU speed-ups, each checked against the stock forward before use --------------------------------
# The first run was bound by per-sample Python in the stock forward (~3.5 steps/s at batch 128 on an
# H100): the vision attention loops over images (a split and an SDPA call per image and layer) and
# get_rope_index loops over the batch. Every image here has the same grid, so attention over images
# is one batched SDPA call, and the M-RoPE positions are a per-label template computed once.

_SEG = {"n": 0}  # patches per image while the batched vision attention is on; 0 = stock behaviour


def _batched_vision_attention(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    from transformers.models.qwen2_vl import modeling_qwen2_vl as M

    n = _SEG["n"]
    seq = hidden_states.shape[0]
    if not n or seq % n:
        return _STOCK["forward"](self, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = M.apply_rotary_pos_emb_vision(q, k, cos, sin)
    # [seq, heads, d] -> [images, heads, patches, d]: images never attend to each other, as with cu_seqlens
    q, k, v = (t.reshape(seq // n, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(o.transpose(1, 2).reshape(seq, -1))


_STOCK: dict = {}


def rope_template(prompt: list[int], config, grid_hw: tuple[int, int]) -> list[list[int]]:
    """Qwen2-VL M-RoPE (t, h, w) positions of a one-image prompt: text counts up, the image's merged
    tokens take (offset, offset + row, offset + col), text after it resumes at max + 1."""
    img = config.image_token_id
    first = prompt.index(img)
    gh, gw = grid_hw
    pos = [[i, i, i] for i in range(first)]
    pos += [[first, first + r, first + c] for r in range(gh) for c in range(gw)]
    nxt = first + max(gh, gw)
    pos += [[nxt + i] * 3 for i in range(len(prompt) - first - gh * gw)]
    return pos


def position_ids(ids: torch.Tensor, prompt_len: list[int], templates: list[list[list[int]]]) -> torch.Tensor:
    """[3, B, L]: the label's template, then the answer continuing one by one (padding past the end)."""
    B, L = ids.shape
    out = torch.empty(3, B, L, dtype=torch.long)
    for b in range(B):
        t = torch.tensor(templates[b], dtype=torch.long).T  # [3, prompt]
        out[:, b, :prompt_len[b]] = t
        out[:, b, prompt_len[b]:] = t[:, -1:] + torch.arange(1, L - prompt_len[b] + 1)
    return out


def enable_speedups(model, processor, prompts) -> dict:
    """Turn the speed-ups on where they give the stock loss on a CPU batch; returns per-label templates or {}."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as M

    cls = getattr(M, "VisionAttention", None)
    items = [generic_sample(3 * 10**9 + i) for i in range(3)]
    b = collate(items, prompts, processor.tokenizer)
    pv, thw = patchify(b["images"], processor.image_processor)
    ids = b["input_ids"]
    kw = dict(input_ids=ids, attention_mask=b["attention_mask"], mm_token_type_ids=(ids == model.config.image_token_id).long(),
              pixel_values=pv, image_grid_thw=thw, labels=b["labels"])
    m = model.float().cpu()
    with torch.no_grad():
        ref = m(**kw).loss.item()
    templates, status = {}, {}
    gh, gw = int(thw[0, 1]) // 2, int(thw[0, 2]) // 2
    try:
        tpl = {lab: rope_template(p, model.config, (gh, gw)) for lab, p in prompts.items()}
        pos = position_ids(ids, [len(prompts[it[1]]) for it in items], [tpl[it[1]] for it in items])
        with torch.no_grad():
            got = m(**kw, position_ids=pos).loss.item()
        status["rope"] = abs(got - ref)
        if abs(got - ref) < 1e-4:
            templates = tpl
    except Exception as err:  # a transformers version whose forward differs: keep the stock path
        status["rope"] = repr(err)
    if cls is not None:
        _STOCK["forward"] = cls.forward
        cls.forward = _batched_vision_attention
        _SEG["n"] = int(thw[0].prod())
        try:
            with torch.no_grad():
                got = m(**kw).loss.item()
            status["vision"] = abs(got - ref)
            if abs(got - ref) >= 1e-4:
                raise ValueError("mismatch")
        except Exception as err:
            status["vision"] = status.get("vision", repr(err))
            cls.forward = _STOCK["forward"]
            _SEG["n"] = 0
    print(f"speed-ups (|loss - stock loss| or error): {status}; rope template on: {bool(templates)}, "
          f"batched vision attention on: {bool(_SEG['n'])}", flush=True)
    return templates


# --- prompts, answers, batches ---------------------------------------------------------------------

def prompt_ids(processor, label: str) -> list[int]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Detect the {label} in this image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[Image.new("RGB", (W, H))], return_tensors="pt")["input_ids"][0].tolist()


def answer_ids(tok, label: str, boxes: list[tuple], width: int = W, height: int = H) -> list[int]:
    text = FMT.render([Box(*b) for b in boxes], width, height, label)
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]


def collate(items, prompts, tok, templates=None):
    """items: (image, label, boxes) -> uint8 images, ids/labels right-padded; loss on answer tokens only."""
    pad = tok.pad_token_id
    ids, labs = [], []
    for _, label, boxes in items:
        p, a = prompts[label], answer_ids(tok, label, boxes)
        ids.append(p + a)
        labs.append([-100] * len(p) + a)
    L = max(map(len, ids))
    out = dict(images=torch.from_numpy(np.stack([np.asarray(i[0]) for i in items])),
               input_ids=torch.tensor([x + [pad] * (L - len(x)) for x in ids]),
               attention_mask=torch.tensor([[1] * len(x) + [0] * (L - len(x)) for x in ids]),
               labels=torch.tensor([x + [-100] * (L - len(x)) for x in labs]))
    if templates:
        out["position_ids"] = position_ids(out["input_ids"], [len(prompts[i[1]]) for i in items],
                                           [templates[i[1]] for i in items])
    return out


class Stream(torch.utils.data.IterableDataset):
    """Endless fresh samples, generated in DataLoader workers (the host was the bottleneck of the probe)."""

    def __init__(self, prompts, tok, batch, seed, templates=None):
        self.prompts, self.tok, self.batch, self.seed, self.templates = prompts, tok, batch, seed, templates

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        k = 0
        while True:
            base = self.seed * 10**8 + (k * nw + wid) * self.batch
            yield collate([generic_sample(base + i) for i in range(self.batch)], self.prompts, self.tok, self.templates)
            k += 1


# --- evaluation ------------------------------------------------------------------------------------

def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@torch.no_grad()
def predict(model, processor, samples, device, batch=64, max_new_tokens=80, pixels=None):
    """Greedy answers for (image, label, boxes) samples, grouped by label so prompts share a length (no
    padding). Returns per sample (boxes in pixels, mean log-prob of the answer tokens, raw text)."""
    tok = processor.tokenizer
    out = [None] * len(samples)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s[1], []).append(i)
    model.eval()
    for label, idx in groups.items():
        p = prompt_ids(processor, label)
        for c in range(0, len(idx), batch):
            chunk = idx[c:c + batch]
            imgs = torch.from_numpy(np.stack([np.asarray(samples[i][0]) for i in chunk]))
            pv, thw = pixels(imgs) if pixels else patchify(imgs, processor.image_processor)
            ids = torch.tensor([p] * len(chunk), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     mm_token_type_ids=(ids == model.config.image_token_id).long(),
                                     pixel_values=pv.to(device), image_grid_thw=thw.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, output_scores=True, return_dict_in_generate=True)
            trans = model.compute_transition_scores(gen.sequences, gen.scores, normalize_logits=True)
            new = gen.sequences[:, ids.shape[1]:]
            for j, i in enumerate(chunk):
                keep = new[j] != tok.pad_token_id
                text = tok.decode(new[j][keep], skip_special_tokens=False).replace("<|im_end|>", "").strip()
                score = float(trans[j][keep].float().mean()) if keep.any() else -99.0
                img = samples[i][0]
                boxes = [(b.x1, b.y1, b.x2, b.y2) for b in FMT.parse(text, img.width, img.height).boxes]
                out[i] = (boxes, score, text)
    model.train()
    return out


def match_stats(samples, preds) -> dict:
    """Recall@0.5 and mean best IoU over ground-truth boxes; correct-None rate on empty queries."""
    hits, ious, n_gt, empty_ok, n_empty, n_pred = 0, [], 0, 0, 0, 0
    for (_, _, gt), (pb, _, _) in zip(samples, preds):
        n_pred += len(pb)
        if not gt:
            n_empty += 1
            empty_ok += not pb
        used = set()
        for g in gt:
            n_gt += 1
            best, bj = 0.0, -1
            for j, b in enumerate(pb):
                v = iou(g, b)
                if v > best and j not in used:
                    best, bj = v, j
            ious.append(best)
            if best >= 0.5:
                hits += 1
                used.add(bj)
    return dict(recall50=hits / max(1, n_gt), mean_iou=float(np.mean(ious)) if ious else 0.0,
                none_ok=empty_ok / max(1, n_empty), boxes_per_gt=n_pred / max(1, n_gt))


def coco_map50(samples, preds) -> float:
    """COCO AP@0.5 through pycocotools, one category, score = mean answer log-prob."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    dt = []
    for i, ((img, _, boxes), (pb, score, _)) in enumerate(zip(samples, preds)):
        gt["images"].append({"id": i, "width": img.width, "height": img.height})
        for b in boxes:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": 1, "iscrowd": 0,
                                      "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
        for b in pb:
            dt.append({"image_id": i, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": math.exp(score)})
    if not dt:
        return 0.0
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = gt
        c.createIndex()
        e = COCOeval(c, c.loadRes(dt), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return float(e.stats[1])


# --- GPU pretraining -------------------------------------------------------------------------------

def load_base(cls, path: str):
    """A saved base, loaded as vlmdet/modeling/load.py loads every model: safetensors only (unpickling a
    pytorch_model.bin runs whatever code it names) and no Python from the folder; a pickle-only folder
    is refused with the reason (ModelError)."""
    check_safe_weights(path, what="base")
    return cls.from_pretrained(path, dtype=torch.float32, use_safetensors=True, **SAFE)


def train(a) -> None:
    import transformers

    from vlmdet.modeling import tiny

    torch.manual_seed(a.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train_log.jsonl", "a")
    processor = tiny.build_processor(MIN_PIXELS, MAX_PIXELS)
    tok = processor.tokenizer
    diff = verify_patchify(processor)
    print(f"patchify vs Qwen2VLImageProcessor: max |diff| = {diff:.2e}", flush=True)
    if diff > 1e-4:
        raise RuntimeError(f"our patch path differs from the processor by {diff}")
    if a.init:  # continue pretraining a saved base (same tokenizer: it is rebuilt identically)
        model = load_base(transformers.Qwen2VLForConditionalGeneration, a.init)
        config = model.config
    else:
        config = tiny.build_config(tok, a.size)
        model = transformers.Qwen2VLForConditionalGeneration(config)
    prompts = {lab: prompt_ids(processor, lab) for lab in LABELS}
    templates = enable_speedups(model, processor, prompts) if a.speedups else {}
    model = model.to(dev)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    print(f"size {a.size}: {n_params / 1e6:.2f}M params", flush=True)
    val = [generic_sample(2 * 10**9 + i) for i in range(a.val)]
    loader = torch.utils.data.DataLoader(Stream(prompts, tok, a.batch, a.seed, templates), batch_size=None, num_workers=a.workers,
                                         pin_memory=dev.type == "cuda", prefetch_factor=4 if a.workers else None,
                                         persistent_workers=a.workers > 0)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.98), fused=dev.type == "cuda")
    t0, last_eval, step, seen = time.time(), time.time(), 0, 0

    def lr_at(progress: float) -> float:  # linear warm-up then cosine to 2% of the peak
        if progress < a.warmup:
            return a.lr * progress / a.warmup
        q = (progress - a.warmup) / (1 - a.warmup)
        return a.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, q))))

    def evaluate(tag):
        te = time.time()
        preds = predict(model, processor, val, dev, batch=128, pixels=lambda im: patchify(im.to(dev), processor.image_processor))
        s = match_stats(val, preds)
        tables = [(v, p) for v, p in zip(val, preds) if v[1] == "table"]
        st = match_stats([v for v, _ in tables], [p for _, p in tables])
        rec = dict(tag=tag, step=step, seen=seen, t=round(time.time() - t0, 1), eval_s=round(time.time() - te, 1),
                   **{k: round(v, 4) for k, v in s.items()}, table_recall50=round(st["recall50"], 4),
                   table_mean_iou=round(st["mean_iou"], 4), example=preds[0][2][:120])
        print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()

    # Fresh batches come from a thread over the DataLoader; when none is ready the step replays a
    # recent one from a small GPU buffer, so the GPU never waits on the host (the probe's bottleneck).
    import queue
    import threading

    fresh: queue.Queue = queue.Queue(maxsize=8)

    def feed():
        for b in loader:
            fresh.put({k: v.to(dev, non_blocking=True) for k, v in b.items()})

    threading.Thread(target=feed, daemon=True).start()
    buffer, n_fresh, rr = [], 0, random.Random(a.seed)
    model.train()
    while True:
        progress = max(step / a.steps, (time.time() - t0) / a.budget)
        if progress >= 1:
            break
        try:
            batch = fresh.get(timeout=None if not buffer else 0)
            buffer = (buffer + [batch])[-a.replay:]
            n_fresh += 1
        except queue.Empty:
            batch = rr.choice(buffer)
        for g in opt.param_groups:
            g["lr"] = lr_at(progress)
        ids = batch["input_ids"].to(dev, non_blocking=True)
        pv, thw = patchify(batch["images"].to(dev, non_blocking=True), processor.image_processor)
        extra = {"position_ids": batch["position_ids"].to(dev, non_blocking=True)} if "position_ids" in batch else {}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model(**extra, input_ids=ids, attention_mask=batch["attention_mask"].to(dev, non_blocking=True),
                         mm_token_type_ids=(ids == config.image_token_id).long(), pixel_values=pv, image_grid_thw=thw,
                         labels=batch["labels"].to(dev, non_blocking=True)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seen += ids.shape[0]
        if step % 100 == 0:
            rec = dict(step=step, t=round(time.time() - t0, 1), loss=round(loss.item(), 4), lr=round(lr_at(progress), 6),
                       samples_per_s=round(seen / (time.time() - t0), 1), fresh=round(n_fresh / step, 3))
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
        if time.time() - last_eval > a.eval_every:
            evaluate("periodic")
            last_eval = time.time()
    evaluate("final")
    model = model.float()
    model.save_pretrained(out / "model", safe_serialization=True)
    processor.save_pretrained(out / "model")
    print(f"saved {out / 'model'} after {step} steps, {seen} samples, {time.time() - t0:.0f}s", flush=True)


# --- CPU check: LoRA fine-tune on nutrition tables, base vs fine-tuned -----------------------------

def nutrition_samples(seed: int, n: int) -> tuple[list, str]:
    from vlmdet.data import synth  # the project's synthetic nutrition tables

    samples = []
    for i in range(n):  # render() is what synth.generate writes to disk: (image, xyxy pixel boxes)
        img, boxes = synth.render(seed, i)
        boxes = sorted((tuple(b) for b in boxes), key=lambda b: (round(b[1] / 8), b[0]))
        samples.append((img.convert("RGB"), synth.CATEGORY, boxes))
    return samples, "vlmdet.data.synth.render"


def check(a) -> None:
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device("cpu")
    processor = transformers.AutoProcessor.from_pretrained(a.base, **SAFE)
    model = load_base(transformers.AutoModelForImageTextToText, a.base)
    tok = processor.tokenizer
    train_s, src = nutrition_samples(1, a.train_n)
    test_s, _ = nutrition_samples(2, a.test_n)
    print(f"data: {src}; {len(train_s)} train, {len(test_s)} test images", flush=True)

    def pixels(imgs):  # the pipeline's own processor on CPU, not our GPU path
        e = processor.image_processor(images=[Image.fromarray(i.numpy()) for i in imgs], return_tensors="pt")
        return e["pixel_values"], e["image_grid_thw"]

    def report(tag, m):
        t = time.time()
        preds = predict(m, processor, test_s, dev, batch=a.test_n, max_new_tokens=64, pixels=pixels)
        s = match_stats(test_s, preds)
        s["map50"] = coco_map50(test_s, preds)
        print(f"{tag}: " + ", ".join(f"{k}={v:.3f}" for k, v in s.items()) + f" (eval {time.time() - t:.1f}s, "
              f"{(time.time() - t) / len(test_s) * 1000:.0f} ms/image) e.g. {preds[0][2][:90]!r}", flush=True)
        return s

    base = report("base", model)
    if a.full:  # full fine-tune: the upper bound of what LoRA could reach in the same time
        a.targets = "all weights"
    else:
        extra = dict(modules_to_save=a.save_modules.split(",")) if a.save_modules else {}
        model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=a.targets.split(","), **extra))
        model.print_trainable_parameters()
    prompts = {"nutrition-table": prompt_ids(processor, "nutrition-table")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    r, t0, step, times = random.Random(0), time.time(), 0, []
    model.train()
    while time.time() - t0 < a.seconds and step < a.steps:
        ts = time.time()
        b = collate(r.sample(train_s, a.batch), prompts, tok)
        pv, thw = pixels(b.pop("images"))
        ids = b["input_ids"]
        frac = max((time.time() - t0) / a.seconds, step / a.steps)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = model(input_ids=ids, attention_mask=b["attention_mask"], mm_token_type_ids=(ids == model.config.image_token_id).long(),
                     pixel_values=pv, image_grid_thw=thw, labels=b["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        step += 1
        times.append(time.time() - ts)
        if step % 20 == 0:
            print(f"step {step} t={time.time() - t0:.0f}s loss={loss.item():.3f}", flush=True)
    print(f"{'full' if a.full else 'LoRA'} r={a.r} alpha={a.alpha} lr={a.lr} on {a.targets} (+{a.save_modules or '-'}): {step} steps x batch {a.batch} in {time.time() - t0:.0f}s, "
          f"median step {np.median(times) * 1000:.0f} ms", flush=True)
    tuned = report("fine-tuned", model)
    print(json.dumps({"base": base, "fine_tuned": tuned, "steps": step, "batch": a.batch}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="pretrain the base on the generic grounding task (GPU)")
    t.add_argument("--out", required=True)
    t.add_argument("--size", default="grounding", help="an entry of vlmdet.modeling.tiny.SIZES")
    t.add_argument("--init", default="", help="continue from this saved base instead of random weights")
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--budget", type=float, default=420, help="seconds; the cosine ends at whichever comes first")
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=float, default=0.04)
    t.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    t.add_argument("--val", type=int, default=256)
    t.add_argument("--eval-every", type=float, default=60)
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--replay", type=int, default=48, help="recent batches kept on the GPU for replay; 1 = no replay")
    t.add_argument("--no-speedups", dest="speedups", action="store_false", help="stock forward only")
    c = sub.add_parser("check", help="CPU: LoRA fine-tune the base on nutrition tables, base vs fine-tuned")
    c.add_argument("--base", default="vlmdet/assets/tiny-qwen2-vl-grounding")
    c.add_argument("--seconds", type=float, default=120)
    c.add_argument("--steps", type=int, default=10**9, help="stop after this many steps (a shared CPU makes seconds unfair)")
    c.add_argument("--batch", type=int, default=4)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--r", type=int, default=16)
    c.add_argument("--alpha", type=int, default=32)
    c.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    c.add_argument("--train-n", type=int, default=400)
    c.add_argument("--test-n", type=int, default=36)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--full", action="store_true", help="fine-tune all weights instead of LoRA")
    c.add_argument("--save-modules", default="", help="modules trained in full beside LoRA, e.g. lm_head")
    a = ap.parse_args(argv)
    train(a) if a.cmd == "train" else check(a)


if __name__ == "__main__":
    sys.exit(main())
