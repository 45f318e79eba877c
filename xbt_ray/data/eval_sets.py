"""Public retrieval benchmarks converted into the evaluation split layout the pipeline reads.

A split directory holds `images/part-*.parquet` (img2dataset-style rows, world.IMAGE_SCHEMA),
`captions.parquet` (key, image_id, txt; world.CAPTION_SCHEMA) and `manifest.json` (counts).

Sources (`fmt`) and their protocols:
- "karpathy": Karpathy's dataset_flickr30k.json / dataset_coco.json plus the image directory.
  "standard" = the Karpathy test split (Flickr30k 1K, COCO 5K); "large-scale" = Flickr30k all
  splits, COCO val+restval.
- "nocaps": the NoCaps validation annotations (COCO-caption JSON) plus the image directory.
  "standard" = "large-scale" = every image of the file.
- "manifest": parquet or JSONL rows (image path OR image_bytes, caption, image_id; several rows
  per image_id = several captions). Protocol "all".
The demo world's held-out split (JPEGs and a Karpathy JSON) goes through the same "karpathy"
path: `demo_eval_split`.

Nothing is lost silently. An image that is missing, unreadable, undecodable, too large or has no
usable caption is skipped and counted by reason, and so are its captions ("image_skipped");
empty captions are skipped as "empty_caption". So for images and for captions alike:
selected = written + sum(skipped). Every written caption refers to a written image, and every
written image has at least one caption (retrieval needs both). Image bytes are kept as they are.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from xbt_ray.config import ConfigError
from xbt_ray.data.world import CAPTION_SCHEMA, IMAGE_SCHEMA

log = logging.getLogger(__name__)

VERSION = 2  # bump when what gets written changes: it is part of the reuse check
MAX_IMAGE_PIXELS = 64_000_000  # same guard as shards.MAX_IMAGE_PIXELS (embedding would skip)
EXIF_ORIENTATION = 0x0112  # width and height are recorded as a viewer shows the image
PROTOCOLS = {
    "karpathy": ("standard", "large-scale"),
    "nocaps": ("standard", "large-scale"),
    "manifest": ("all",),
}


@dataclass
class Item:
    """One selected image: its key, where its bytes are (path, bytes or None), its captions."""

    key: str
    image: Path | bytes | None
    captions: list


# -----------------------------------------------------------------------------
# loaders: annotation file -> (dataset name, selected items, captions skipped before selection)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def _image_dir(image_root) -> Path:
    if image_root is None or not Path(image_root).is_dir():
        raise ConfigError(f"image directory not found: {image_root}")
    return Path(image_root)


def load_karpathy(path: Path, image_root, protocol: str, dataset: str | None):
    """Karpathy-split JSON. Keys are "<dataset>-<cocoid>" (COCO) or "<dataset>-<imgid>"."""
    images = _read_json(path).get("images")
    if not isinstance(images, list):
        raise ConfigError(f"{path} has no 'images' list: not a Karpathy-format file")
    root = _image_dir(image_root)
    is_coco = any("cocoid" in im for im in images)
    dataset = dataset or path.stem.removeprefix("dataset_")
    if protocol == "standard":
        splits = {"test"}
    else:  # large-scale
        splits = {"val", "restval"} if is_coco else {im.get("split") for im in images}
    items = []
    for im in images:
        if im.get("split") not in splits:
            continue
        image_path = root / im.get("filepath", "") / im["filename"]
        captions = [s.get("raw") for s in im.get("sentences", [])]
        items.append(Item(f"{dataset}-{im['cocoid'] if is_coco else im['imgid']}", image_path,
                          captions))
    return dataset, items, Counter()


def load_nocaps(path: Path, image_root, protocol: str, dataset: str | None):
    """NoCaps (COCO-caption style) JSON; every image of the file. Keys are "<dataset>-<id>"."""
    data = _read_json(path)
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ConfigError(f"{path} needs 'images' and 'annotations' lists (the NoCaps test "
                          "file has no public captions)")
    root = _image_dir(image_root)
    dataset = dataset or "nocaps"
    items = [Item(f"{dataset}-{im['id']}", root / im["file_name"], []) for im in data["images"]]
    by_id = {im["id"]: item for im, item in zip(data["images"], items)}
    skipped = Counter()
    for ann in data["annotations"]:
        if ann.get("image_id") in by_id:
            by_id[ann["image_id"]].captions.append(ann.get("caption"))
        else:
            skipped["unknown_image"] += 1
    return dataset, items, skipped


def load_manifest(path: Path, image_root, protocol: str, dataset: str | None):
    """Parquet or JSONL manifest. Relative image paths resolve against image_root if given,
    else the manifest's directory. JSONL image_bytes are base64. Keys are "<dataset>-<image_id>".
    """
    if path.suffix == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise ConfigError(f"cannot read {path} as parquet: {e}") from None
    elif path.suffix in (".jsonl", ".ndjson"):
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path} as JSON lines: {e}") from None
    else:
        raise ConfigError(f"manifest must be .parquet or .jsonl, got {path.name}")
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    missing = {"caption", "image_id"} - columns
    if missing or not columns & {"image", "image_bytes"}:
        raise ConfigError(f"{path} needs columns image_id, caption and image or image_bytes "
                          f"(has {sorted(columns)})")
    base = Path(image_root) if image_root is not None else path.parent
    dataset = dataset or path.stem
    items: dict[str, Item] = {}
    skipped = Counter()
    for i, row in enumerate(rows):
        if row.get("image_id") is None:
            skipped["missing_image_id"] += 1
            continue
        image_id = str(row["image_id"])
        image = row.get("image_bytes")
        if isinstance(image, str):
            try:
                image = base64.b64decode(image, validate=True)
            except ValueError:
                image = b""  # counted as undecodable_image below
        elif image is None and row.get("image") is not None:
            image = Path(row["image"]) if Path(row["image"]).is_absolute() else base / row["image"]
        item = items.setdefault(image_id, Item(f"{dataset}-{image_id}", image, []))
        if item.image != image:
            raise ConfigError(f"{path} row {i}: image_id {image_id} names two different images")
        item.captions.append(row.get("caption"))
    return dataset, list(items.values()), skipped


LOADERS = {"karpathy": load_karpathy, "nocaps": load_nocaps, "manifest": load_manifest}

# -----------------------------------------------------------------------------
# checking and writing


def clean_caption(text) -> str | None:
    """Whitespace-normalised caption (as shards.check_caption does), or None when empty."""
    text = " ".join(text.split()) if isinstance(text, str) else ""
    return text or None


def read_image(image: Path | bytes | None) -> tuple[bytes | None, int, int, str]:
    """(bytes as they are, width, height, "") for a decodable image, else (None, 0, 0, reason).
    Width and height are as the image is shown: swapped when its EXIF Orientation turns it."""
    if image is None:
        return None, 0, 0, "no_image"
    if isinstance(image, Path):
        try:
            image = image.read_bytes()
        except FileNotFoundError:
            return None, 0, 0, "missing_file"
        except OSError:
            return None, 0, 0, "unreadable_file"
    try:
        with Image.open(io.BytesIO(image)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                return None, 0, 0, "image_too_large"
            img.load()
            width, height = img.size
            if img.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # shown turned by 90 degrees
                width, height = height, width
            return image, width, height, ""
    except Image.DecompressionBombError:
        return None, 0, 0, "image_too_large"
    except Exception:  # PIL raises many types for bad bytes; all mean the same here
        return None, 0, 0, "undecodable_image"


def write_split(items: list[Item], out_dir: Path, rows_per_shard: int,
                caption_skips: Counter | None = None) -> dict:
    """Write images/ shards and captions.parquet under out_dir; return the counts."""
    (out_dir / "images").mkdir(parents=True)
    skipped = {"images": Counter(), "captions": Counter(caption_skips or {})}
    buffer, captions, n_shards, n_images = [], [], 0, 0

    def flush():
        nonlocal buffer, n_shards, n_images
        table = pa.Table.from_pylist(buffer, schema=IMAGE_SCHEMA)
        pq.write_table(table, out_dir / "images" / f"part-{n_shards:05d}.parquet")
        buffer, n_shards, n_images = [], n_shards + 1, n_images + len(buffer)

    for item in items:
        texts = [(j, clean_caption(t)) for j, t in enumerate(item.captions)]
        texts = [(j, t) for j, t in texts if t is not None]
        skipped["captions"]["empty_caption"] += len(item.captions) - len(texts)
        data, width, height, reason = read_image(item.image) if texts else (None, 0, 0,
                                                                            "no_captions")
        if reason:
            skipped["images"][reason] += 1
            skipped["captions"]["image_skipped"] += len(texts)
            continue
        buffer.append({"key": item.key, "jpg": data, "txt": texts[0][1], "status": "success",
                       "error_message": None, "width": width, "height": height,
                       "image_id": item.key})
        captions += [{"key": f"{item.key}-{j}", "image_id": item.key, "txt": t} for j, t in texts]
        if len(buffer) == rows_per_shard:
            flush()
    if buffer:
        flush()
    pq.write_table(pa.Table.from_pylist(captions, schema=CAPTION_SCHEMA),
                   out_dir / "captions.parquet")
    return {"images": n_images, "captions": len(captions), "shards": n_shards,
            "skipped": {k: dict(sorted((r, n) for r, n in v.items() if n))
                        for k, v in skipped.items()}}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_eval_split(fmt: str, annotations, image_root, protocol: str, out_dir,
                       dataset: str | None = None, rows_per_shard: int = 1000) -> dict:
    """Convert a benchmark into an evaluation split at out_dir; return (and write) its manifest.

    The manifest is {"dataset", "protocol", "images", "captions", "shards",
    "selected": {"images", "captions"}, "skipped": {"images": {reason: n}, "captions": {...}},
    "source"}. The split is written to a temporary sibling directory and renamed into place.
    A non-empty out_dir is reused when it holds the same finished request (same `source`:
    arguments, annotation file content, VERSION), else refused. Image files are not hashed.
    """
    if fmt not in PROTOCOLS:
        raise ConfigError(f"unknown eval set format '{fmt}', expected one of {tuple(PROTOCOLS)}")
    if protocol not in PROTOCOLS[fmt]:
        raise ConfigError(f"unknown protocol '{protocol}' for {fmt}, expected one of "
                          f"{PROTOCOLS[fmt]}")
    if rows_per_shard < 1:
        raise ConfigError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    annotations, out_dir = Path(annotations).resolve(), Path(out_dir)
    if not annotations.is_file():
        raise ConfigError(f"annotation file not found: {annotations}")
    source = {"format": fmt, "annotations": str(annotations), "sha256": _sha256(annotations),
              "image_root": str(Path(image_root).resolve()) if image_root is not None else None,
              "protocol": protocol, "dataset": dataset, "rows_per_shard": rows_per_shard,
              "version": VERSION}
    if out_dir.is_dir() and any(out_dir.iterdir()):
        try:
            manifest = json.loads((out_dir / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            manifest = None
        if manifest is None or manifest.get("source") != source:
            raise ConfigError(f"{out_dir} is not empty and holds no identical finished split; "
                              "remove it or choose another out_dir")
        log.info("eval split already prepared in %s (reused)", out_dir)
        return manifest

    try:
        name, items, caption_skips = LOADERS[fmt](annotations, image_root, protocol, dataset)
    except (KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{annotations}: malformed {fmt} entry ({type(e).__name__}: {e})") \
            from None
    if not items:
        raise ConfigError(f"protocol '{protocol}' selects 0 images from {annotations}")
    keys = Counter(item.key for item in items)
    if len(keys) < len(items):
        raise ConfigError(f"{annotations}: duplicate image id {keys.most_common(1)[0][0]}")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = write_split(items, tmp, rows_per_shard, caption_skips)
        if counts["images"] == 0:
            raise ConfigError(f"none of the {len(items)} selected images of {annotations} could "
                              f"be used: {counts['skipped']['images']}")
        selected = {"images": len(items),
                    "captions": sum(len(i.captions) for i in items) + sum(caption_skips.values())}
        manifest = {"dataset": name, "protocol": protocol, "images": counts["images"],
                    "captions": counts["captions"], "shards": counts["shards"],
                    "selected": selected, "skipped": counts["skipped"], "source": source}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("eval split %s/%s: %d images, %d captions, skipped %s", name, protocol,
             manifest["images"], manifest["captions"], manifest["skipped"])
    return manifest


DEMO_SPLIT_DIR = "eval_split"


def demo_eval_split(world_dir) -> Path:
    """The demo world's evaluation split, prepared from its held-out JPEGs and Karpathy JSON by
    `prepare_eval_split("karpathy", ...)` (what `xbt eval-data` runs on Flickr30k or COCO) into
    world_dir/eval_split/ (images/part-*.parquet, captions.parquet, manifest.json); returns it.

    Reused when already prepared. A split prepared where the world used to be (the cache moved or
    was copied: its recorded source paths differ) is prepared again.
    """
    from xbt_ray.data.world import EVAL_ANNOTATIONS, EVAL_PROTOCOL

    world_dir = Path(world_dir)
    try:
        config = json.loads((world_dir / "manifest.json").read_text())["config"]
    except (OSError, json.JSONDecodeError, KeyError):
        raise ConfigError(f"{world_dir} is not a built demo world (no manifest.json)") from None
    out = world_dir / DEMO_SPLIT_DIR
    args = ("karpathy", world_dir / "eval" / EVAL_ANNOTATIONS, world_dir / "eval" / "images",
            EVAL_PROTOCOL, out)
    try:
        prepare_eval_split(*args, rows_per_shard=config["rows_per_shard"])
    except ConfigError:
        if not out.is_dir():
            raise
        log.info("demo eval split %s was prepared elsewhere: preparing it again", out)
        shutil.rmtree(out)
        prepare_eval_split(*args, rows_per_shard=config["rows_per_shard"])
    return out
