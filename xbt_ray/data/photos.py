"""A small evaluation split of real photographs that ship inside installable packages.

The photos are files bundled with scikit-image (`skimage/data`: only those in the wheel, none
that `skimage.data` would download), scikit-learn (`sklearn/datasets/images`) and matplotlib
(`mpl-data/sample_data`): colour and greyscale, PNG and JPEG, of several sizes and aspect ratios.
Their captions (2-5 each, written for this project) are in `photos_karpathy.json` beside this
module, in Karpathy's format with every image in the "test" split, so that
`xbt eval-data --format karpathy --protocol standard` selects them all. Each entry names the file
it is copied from: {"source": {"package", "path"}} (relative to the package's directory).

    pip install scikit-image scikit-learn      # (matplotlib is a dependency already)
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from xbt_ray.config import ConfigError

CAPTIONS = Path(__file__).with_name("photos_karpathy.json")
ANNOTATIONS = "dataset_photos.json"   # Karpathy's file names: dataset_<name>.json -> "photos"
DISTRIBUTIONS = {"skimage": "scikit-image", "sklearn": "scikit-learn",
                 "matplotlib": "matplotlib"}


def photo_captions() -> dict:
    """The shipped Karpathy-format document (with each image's `source`)."""
    return json.loads(CAPTIONS.read_text())


def photo_sources() -> dict[str, Path]:
    """filename -> the installed file it is copied from. A one-line ConfigError names the
    packages to install when one is missing (located without importing it)."""
    sources, missing = {}, set()
    for im in photo_captions()["images"]:
        package = im["source"]["package"]
        spec = importlib.util.find_spec(package)
        path = (Path(spec.origin).parent / im["source"]["path"]
                if spec is not None and spec.origin else None)
        if path is None or not path.is_file():
            missing.add(package)
            continue
        sources[im["filename"]] = path
    if missing:
        names = " ".join(sorted(DISTRIBUTIONS.get(p, p) for p in missing))
        raise ConfigError(f"the photo split needs files that ship with {names}: "
                          f"pip install {names}")
    return sources


def write_photo_split(out_dir) -> tuple[Path, Path]:
    """Copy every photo as it ships (same bytes and format) into out_dir/images/ and write
    out_dir/dataset_photos.json; return (karpathy_json, images_dir)."""
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for filename, source in photo_sources().items():
        shutil.copyfile(source, images_dir / filename)
    annotations = out_dir / ANNOTATIONS
    shutil.copyfile(CAPTIONS, annotations)
    return annotations, images_dir
