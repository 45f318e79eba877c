"""The demo world: procedurally drawn scenes of coloured shapes, their captions, and the shards.

A scene is 1-3 objects (shape, colour, size, cell of a 3x3 grid) on a plain light or dark
background. `render` draws it with PIL; `caption` describes it with varied templates and synonyms,
always naming every object's shape and colour (size and position are sometimes left out).
`build_world` writes what the real pipeline reads: img2dataset-style parquet shards of image-text
pairs (a known share of them broken on purpose), a text-only caption corpus, and a held-out split
with several captions per image, plus a manifest. The held-out split is laid out as a public
benchmark ships (JPEG files and a Karpathy-format JSON), so the pipeline prepares it with the
same code as Flickr30k or COCO (`eval_sets.demo_eval_split`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from xbt_ray.config import WorldConfig

RECIPE_VERSION = 3  # bump when drawing or caption code changes: it is part of the fingerprint
BROKEN_KINDS = ("undecodable", "null_image", "empty_caption")

# -----------------------------------------------------------------------------
# vocabulary: each concept's name, then the words a caption may use for it

SHAPES = {
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon",),
    "ring": ("ring", "hoop"),
}
COLOURS = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "tangerine"),
    "yellow": ("yellow", "golden"),
    "green": ("green", "emerald"),
    "cyan": ("cyan", "turquoise"),
    "blue": ("blue", "cobalt"),
    "purple": ("purple", "violet"),
    "pink": ("pink", "rose"),
    "brown": ("brown", "chocolate"),
}
RGB = {
    "red": (215, 35, 35), "orange": (245, 130, 20), "yellow": (240, 210, 30),
    "green": (40, 170, 60), "cyan": (30, 200, 210), "blue": (35, 70, 225),
    "purple": (135, 50, 185), "pink": (245, 120, 190), "brown": (130, 80, 35),
}
SIZES = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
RADIUS = {"small": 0.2, "large": 0.38}  # in cells (a cell is a third of the image side)
TONES = {"light": ("light", "pale", "bright"), "dark": ("dark", "black", "dim")}
CELLS = ("top left", "top", "top right", "left", "centre", "right",
         "bottom left", "bottom", "bottom right")
POSITIONS = (
    ("in the top left", "in the upper left", "in the top left corner"),
    ("at the top", "along the top", "at the top middle"),
    ("in the top right", "in the upper right", "in the top right corner"),
    ("on the left", "at the left"),
    ("in the centre", "in the middle", "in the center"),
    ("on the right", "at the right"),
    ("in the bottom left", "in the lower left", "in the bottom left corner"),
    ("at the bottom", "along the bottom", "at the bottom middle"),
    ("in the bottom right", "in the lower right", "in the bottom right corner"),
)
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "{objects}",
    "there is {objects}",
    "picture of {objects}",
    "a photo of {objects}",
    "an image showing {objects}",
    "{objects} on a {tone} background",
    "{count}: {objects}",
    "{first} next to {rest}",
)

# -----------------------------------------------------------------------------
# scenes


@dataclass(frozen=True)
class Obj:
    """One shape. x, y, radius are in image units (0..1, y down)."""

    shape: str
    colour: str
    size: str
    cell: int
    x: float
    y: float
    radius: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    tone: str                          # "light" or "dark"
    background: tuple[int, int, int]
    noise_seed: int                    # seeds the pixel noise, so `render` needs no rng


def draw_scene(rng: random.Random, cfg: WorldConfig) -> Scene:
    """Draw a random scene: objects_min..objects_max objects in distinct cells of a 3x3 grid."""
    n = rng.randint(cfg.objects_min, min(cfg.objects_max, len(CELLS)))
    objects = []
    for cell in rng.sample(range(len(CELLS)), n):
        row, col = divmod(cell, 3)
        size = rng.choice(tuple(SIZES))
        colour = rng.choice(tuple(COLOURS))
        objects.append(Obj(
            shape=rng.choice(tuple(SHAPES)), colour=colour, size=size, cell=cell,
            x=(col + 0.5 + rng.uniform(-0.08, 0.08)) / 3,
            y=(row + 0.5 + rng.uniform(-0.08, 0.08)) / 3,
            radius=RADIUS[size] * rng.uniform(0.9, 1.1) / 3,
            rgb=tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in RGB[colour]),
        ))
    tone = rng.choice(tuple(TONES))
    base = rng.randint(205, 240) if tone == "light" else rng.randint(15, 50)
    background = tuple(min(255, max(0, base + rng.randint(-10, 10))) for _ in range(3))
    return Scene(tuple(objects), tone, background, rng.getrandbits(32))


# -----------------------------------------------------------------------------
# drawing

SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges at 64 px


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    angles = np.pi * np.arange(2 * points) / points - np.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles)))


POLYGONS = {  # unit outlines around (0, 0), y down
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)],
    "diamond": [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)],
    "star": _star(5, 0.45),
    "cross": [(-0.3, -0.95), (0.3, -0.95), (0.3, -0.3), (0.95, -0.3), (0.95, 0.3), (0.3, 0.3),
              (0.3, 0.95), (-0.3, 0.95), (-0.3, 0.3), (-0.95, 0.3), (-0.95, -0.3), (-0.3, -0.3)],
    "hexagon": [(np.cos(a), np.sin(a)) for a in np.pi / 3 * np.arange(6)],
}


def render(scene: Scene, size: int) -> Image.Image:
    """Draw `scene` as a size x size RGB image with mild pixel noise."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        cx, cy, r = o.x * big, o.y * big, o.radius * big
        box = (cx - r, cy - r, cx + r, cy + r)
        if o.shape == "circle":
            draw.ellipse(box, fill=o.rgb)
        elif o.shape == "ring":
            draw.ellipse(box, outline=o.rgb, width=max(1, round(0.4 * r)))
        else:
            draw.polygon([(cx + r * px, cy + r * py) for px, py in POLYGONS[o.shape]], fill=o.rgb)
    image = image.resize((size, size), Image.BOX)
    noise = np.random.default_rng(scene.noise_seed).integers(-6, 7, (size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# -----------------------------------------------------------------------------
# captions


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(phrases: list[str], rng: random.Random) -> str:
    if len(phrases) == 1:
        return phrases[0]
    last = rng.choice((" and ", " and ", " with ")) if len(phrases) == 2 else " and "
    return ", ".join(phrases[:-1]) + last + phrases[-1]


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption naming every object's shape and colour, often its size and position."""
    template = rng.choice(TEMPLATES if len(scene.objects) > 1 else TEMPLATES[:-1])
    with_size = rng.random() < 0.7
    with_position = rng.random() < 0.6 and "next to" not in template  # no "top left next to"
    phrases = []
    for o in rng.sample(scene.objects, len(scene.objects)):
        words = [rng.choice(SIZES[o.size])] if with_size else []
        words += [rng.choice(COLOURS[o.colour]), rng.choice(SHAPES[o.shape])]
        phrase = _with_article(" ".join(words))
        if with_position:
            phrase += " " + rng.choice(POSITIONS[o.cell])
        phrases.append(phrase)
    count = NUMBERS[len(phrases) - 1] + (" shapes" if len(phrases) > 1 else " shape")
    return template.format(
        objects=_join(phrases, rng), first=phrases[0], rest=_join(phrases[1:], rng),
        tone=rng.choice(TONES[scene.tone]), count=count,
    )


def distinct_captions(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """n captions of one scene, distinct where 20 draws per caption allow it."""
    captions: list[str] = []
    for _ in range(n):
        for _ in range(20):
            text = caption(scene, rng)
            if text not in captions:
                break
        captions.append(text)
    return captions


# -----------------------------------------------------------------------------
# shards

IMAGE_SCHEMA = pa.schema([  # img2dataset's parquet columns, plus image_id
    ("key", pa.string()), ("jpg", pa.binary()), ("txt", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("image_id", pa.string()),
])
TEXT_SCHEMA = pa.schema([("key", pa.string()), ("txt", pa.string())])
CAPTION_SCHEMA = pa.schema([("key", pa.string()), ("image_id", pa.string()), ("txt", pa.string())])


def world_fingerprint(cfg: WorldConfig) -> str:
    """Short hash of the world config and RECIPE_VERSION: same fingerprint, same world."""
    blob = json.dumps({"recipe": RECIPE_VERSION, **dataclasses.asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rng(cfg: WorldConfig, stream: str) -> random.Random:
    """An independent, reproducible random stream per purpose (train, text, eval, broken)."""
    return random.Random(f"xbt-world/{cfg.seed}/{stream}")


def _image_row(key: str, jpg: bytes | None, txt: str, size: int | None) -> dict:
    return {"key": key, "jpg": jpg, "txt": txt, "status": "success", "error_message": None,
            "width": size, "height": size, "image_id": key}


def _write_shards(rows: list[dict], schema: pa.Schema, directory: Path, rows_per_shard: int) -> int:
    """Write rows as part-00000.parquet, part-00001.parquet, ... (one empty shard if no rows)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    starts = range(0, len(rows), rows_per_shard) or [0]
    for i, start in enumerate(starts):
        table = pa.Table.from_pylist(rows[start:start + rows_per_shard], schema=schema)
        pq.write_table(table, directory / f"part-{i:05d}.parquet")
    return len(starts)


def _broken_rows(cfg: WorldConfig, n: int) -> dict[int, str]:
    """Row index -> broken kind: round(broken_fraction * n) rows (at least one per kind)."""
    if cfg.broken_fraction <= 0 or n == 0:
        return {}
    count = min(n, max(len(BROKEN_KINDS), round(cfg.broken_fraction * n)))
    rows = _rng(cfg, "broken").sample(range(n), count)
    return {row: BROKEN_KINDS[i % len(BROKEN_KINDS)] for i, row in enumerate(rows)}


def build_world(cfg: WorldConfig, out_dir: Path) -> dict:
    """Write image_text/, text/, eval/ and manifest.json under out_dir; return the manifest."""
    out_dir = Path(out_dir)
    size = cfg.image_size

    # image-text pairs in COCO / Flickr layout: one row per caption, 3-5 captions per image,
    # each row carrying the image's bytes and `image_id`; row keys differ from image ids. Some
    # images are broken on purpose (in every row that shows them), some captions are empty.
    rng, broken = _rng(cfg, "train"), _broken_rows(cfg, cfg.n_train_images)
    junk = _rng(cfg, "junk")
    rows, broken_keys = [], {kind: [] for kind in BROKEN_KINDS}
    for i in range(cfg.n_train_images):
        scene = draw_scene(rng, cfg)
        jpg = encode_jpeg(render(scene, size))
        kind = broken.get(i)
        if kind == "undecodable":
            jpg = b"not an image:" + junk.randbytes(256)
        texts = distinct_captions(scene, rng, rng.randint(cfg.train_captions_min,
                                                          cfg.train_captions_max))
        for j, text in enumerate(texts):
            row = _image_row(f"{len(rows):09d}", jpg, text, size)
            row["image_id"] = f"img-{i:07d}"
            if kind == "null_image":
                row.update(jpg=None, width=None, height=None)
            if kind == "empty_caption" and j == 0:
                row["txt"] = ""
            if kind and (kind != "empty_caption" or j == 0):
                broken_keys[kind].append(row["key"])
            rows.append(row)
    rows_written = rows
    n_image_text_shards = _write_shards(rows, IMAGE_SCHEMA, out_dir / "image_text",
                                        cfg.rows_per_shard)

    # text-only caption corpus of fresh scenes
    rng = _rng(cfg, "text")
    rows = [{"key": f"txt-{i:09d}", "txt": caption(draw_scene(rng, cfg), rng)}
            for i in range(cfg.n_text_captions)]
    n_text_shards = _write_shards(rows, TEXT_SCHEMA, out_dir / "text", cfg.rows_per_shard)

    # held-out images with several captions each, laid out as Flickr30k is: JPEG files and a
    # Karpathy-format JSON (eval_sets.demo_eval_split turns them into the pipeline's split)
    n_eval_captions = write_heldout(cfg, out_dir / "eval")

    manifest = {
        "fingerprint": world_fingerprint(cfg),
        "recipe_version": RECIPE_VERSION,
        "counts": {"image_text": len(rows_written), "image_text_images": cfg.n_train_images,
                   "text": cfg.n_text_captions,
                   "eval_images": cfg.n_eval_images, "eval_captions": n_eval_captions},
        "shards": {"image_text": n_image_text_shards, "text": n_text_shards},
        "eval": {"annotations": f"eval/{EVAL_ANNOTATIONS}", "images": "eval/images",
                 "format": "karpathy", "split": EVAL_SPLIT, "protocol": EVAL_PROTOCOL},
        "broken": {kind: sum(k == kind for k in broken.values()) for kind in BROKEN_KINDS},
        "broken_keys": broken_keys,
        "config": dataclasses.asdict(cfg),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# -----------------------------------------------------------------------------
# the held-out split, as a public benchmark ships: images and a Karpathy-format JSON

EVAL_ANNOTATIONS = "dataset_demo.json"   # Karpathy's file names: dataset_<name>.json
EVAL_SPLIT = "test"                      # every held-out image is in Karpathy's "test" split,
EVAL_PROTOCOL = "standard"               # which eval_sets' "standard" protocol selects


def karpathy_tokens(text: str) -> list[str]:
    """Lower-case words without punctuation, as the `tokens` of Karpathy's files."""
    return re.findall(r"[a-z0-9]+", text.lower())


def write_heldout(cfg: WorldConfig, eval_dir: Path) -> int:
    """Write eval_dir/images/eval-NNNNNN.jpg and eval_dir/dataset_demo.json (Karpathy format:
    {"dataset", "images": [{"filename", "imgid", "split", "sentids", "sentences": [{"raw",
    "tokens", "imgid", "sentid"}]}]}, as Flickr30k's); return the number of captions."""
    shutil.rmtree(eval_dir, ignore_errors=True)
    (eval_dir / "images").mkdir(parents=True)
    rng = _rng(cfg, "eval")
    entries, n_captions = [], 0
    for i in range(cfg.n_eval_images):
        scene = draw_scene(rng, cfg)
        captions = distinct_captions(scene, rng, cfg.captions_per_eval_image)
        filename = f"eval-{i:06d}.jpg"
        (eval_dir / "images" / filename).write_bytes(encode_jpeg(render(scene, cfg.image_size)))
        sentids = list(range(n_captions, n_captions + len(captions)))
        entries.append({
            "filename": filename, "imgid": i, "split": EVAL_SPLIT, "sentids": sentids,
            "sentences": [{"raw": text, "tokens": karpathy_tokens(text), "imgid": i,
                           "sentid": sentid} for text, sentid in zip(captions, sentids)],
        })
        n_captions += len(captions)
    (eval_dir / EVAL_ANNOTATIONS).write_text(json.dumps({"dataset": "demo", "images": entries}))
    return n_captions
