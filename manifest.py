"""
Real data for nanoCOOPER: a JSONL manifest of image files, optional depth and segmentation files,
and questions, turned into the same arrays the synthetic renderer writes (data.load_split's format),
so every later stage reads real and synthetic data alike.

    python data.py --manifest="real/{split}.jsonl" --out_dir=data/real

Depth and segmentation are brought to the renderer's conventions: depth in metres within
[DEPTH_MIN, DEPTH_MAX] with NaN where there is no reading, and instance ids renumbered 2… left to
right (data.py's canonical order; manifest objects carry no colour, so these ids are also
their palette entries). Every error names the manifest line and the file.
"""
import json
import os
import re

import numpy as np
from PIL import Image

from data import DEPTH_MAX, DEPTH_MIN, MODALITIES, SEG_PALETTE


def _fit(img, size, resample):
    """Resize the shorter side to `size`, then centre-crop to size×size."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), resample)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _canonical_ids(ids):
    """Arbitrary instance ids (0 = background) -> 0 background, 2… instances ordered left to right
    by centroid, as the synthetic renderer numbers them. Beyond the palette, the smallest
    instances merge into the background."""
    labels, counts = np.unique(ids[ids > 0], return_counts=True)
    keep = labels[np.argsort(-counts, kind="stable")][:len(SEG_PALETTE) - 2]
    cols = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    keep = sorted(keep, key=lambda k: cols[ids == k].mean())
    out = np.zeros(ids.shape, dtype=np.uint8)
    for new, k in enumerate(keep):
        out[ids == k] = 2 + new
    return out


def load_manifest(path, image_size=64):
    """Real data. Each line of the JSONL at `path` is an object with
        image     path to an RGB image (any format pillow reads), relative to the manifest
        depth     optional: 16-bit PNG in millimetres, or .npy in metres
        seg       optional: PNG of instance ids (0 = background)
        question, answer, category   (and optionally answer_type, tool)
    Returns the load_split format; depth is NaN and seg 0 where a file is absent. Every error
    names the manifest line and the file."""
    root = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest {path} not found")
    images, scenes, questions, index = {m: [] for m in MODALITIES}, [], [], {}
    for n, line in enumerate(open(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
        missing = [k for k in ("image", "question", "answer", "category") if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        key = (row["image"], row.get("depth"), row.get("seg"))
        if key not in index:
            index[key] = len(scenes)
            rgb, depth, seg = _load_files(root, row, where, image_size)
            for m, a in zip(MODALITIES, (rgb, depth, seg)):
                images[m].append(a)
            scenes.append({"image": row["image"], "has_depth": row.get("depth") is not None,
                           "has_seg": row.get("seg") is not None, "image_size": image_size})
        q = {k: v for k, v in row.items() if k not in ("image", "depth", "seg")}
        questions.append({"scene": index[key], **_typed(q)})
    if not scenes:
        raise ValueError(f"manifest {path} has no entries")
    out = {m: np.stack(a) for m, a in images.items()}
    out["scenes"], out["questions"] = scenes, questions
    return out


def _typed(q):
    """Fill in what scoring needs when a manifest leaves it out: the answer type (and, for
    numbers, value and unit) read off the answer, a kind, and the tool flag "none"."""
    q = dict(q)
    q.setdefault("kind", q["category"])
    q.setdefault("tool", "none")
    a = str(q["answer"]).strip()
    num = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*(m|cm)", a)
    if "answer_type" not in q:
        q["answer_type"] = ("number" if num else "yesno" if a.lower() in ("yes", "no")
                            else "integer" if a.isdigit() else "choice")
    if q["answer_type"] == "number" and num:
        q.setdefault("value", float(num.group(1)))
        q.setdefault("unit", num.group(2))
    if q["answer_type"] == "choice":
        q.setdefault("choices", [a])
    return q


def _load_files(root, row, where, size):
    def open_image(field):
        f = os.path.join(root, row[field])
        if not os.path.exists(f):
            raise FileNotFoundError(f"{where}: {field} file {f} not found")
        try:
            img = Image.open(f)
            img.load()
            return img
        except Exception as e:
            raise ValueError(f"{where}: cannot read {field} file {f}: {e}") from None

    rgb = np.asarray(_fit(open_image("image").convert("RGB"), size, Image.BICUBIC))
    depth = np.full((size, size), np.nan, dtype=np.float32)
    if row.get("depth") is not None:
        if row["depth"].endswith(".npy"):
            f = os.path.join(root, row["depth"])
            try:
                metres = np.load(f).astype(np.float32)
            except FileNotFoundError:
                raise FileNotFoundError(f"{where}: depth file {f} not found") from None
            except Exception as e:
                raise ValueError(f"{where}: cannot read depth file {f}: {e}") from None
            if metres.ndim != 2:
                raise ValueError(f"{where}: depth file {f} has shape {metres.shape}, expected (H, W)")
        else:
            img = open_image("depth")
            if img.mode not in ("I;16", "I;16B", "I", "L"):
                raise ValueError(f"{where}: depth PNG {row['depth']} has mode {img.mode}, expected 16-bit millimetres")
            metres = np.asarray(img, dtype=np.float32) / 1000.0
        # nearest-neighbour: interpolating depth across an object boundary invents surfaces
        d = _fit(Image.fromarray(metres, mode="F"), size, Image.NEAREST)
        depth = np.asarray(d, dtype=np.float32)
        depth = np.where(depth > 0, np.clip(depth, DEPTH_MIN, DEPTH_MAX), np.nan).astype(np.float32)  # 0 = no reading
    seg = np.zeros((size, size), dtype=np.uint8)
    if row.get("seg") is not None:
        ids = np.asarray(open_image("seg"), dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"{where}: seg file {row['seg']} must be a single-channel PNG of ids")
        ids = np.asarray(_fit(Image.fromarray(ids.astype(np.int32), mode="I"), size, Image.NEAREST), dtype=np.int64)
        seg = _canonical_ids(ids)
    return rgb, depth, seg
