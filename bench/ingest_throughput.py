"""Ingest throughput: ``lorapipe.stages.ingest.run`` (``workers=0``: a process pool, one worker
per core) against a single-process decode loop, on the same generated photos.

    python bench/ingest_throughput.py [--images 200] [--width 1024] [--height 768]

The images are photos-like (smooth random colour fields with grain, each different), three in
four JPEG and one in four PNG, in a temporary folder.

- lorapipe: the whole ``run`` (input listing, pass 1 decoding every file for its size, hashes
  and quality measures, choosing keepers and near duplicates, pass 2 decoding and PNG-encoding
  the keepers into a dataset, the report), timed end to end, pool start-up included.
- single-process decode loop, the minimal loop a user would write: for each file
  ``Image.open``, ``load()``, ``ImageOps.exif_transpose``, ``convert("RGB")``, sha256 of the
  pixels, PNG-encode and write the PNG to an output folder. No near-duplicate hashing, no
  checks, no report.

Prints images/s of each and the ratio, then what the quality audit (``lorapipe.quality``)
costs: its time per image against decoding the same file, in one process.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorapipe-bench-") as tmp:
        compare(args, Path(tmp))


def compare(args: argparse.Namespace, workdir: Path) -> None:
    from lorapipe.stages.ingest import IngestConfig, run

    photos = workdir / "photos"
    write_photos(photos, args.images, args.width, args.height)
    megabytes = sum(p.stat().st_size for p in photos.iterdir()) / 2**20
    print(
        f"{args.images} photos-like images of {args.width}x{args.height} "
        f"({megabytes:.0f} MiB; 3/4 JPEG, 1/4 PNG); {os.cpu_count()} CPU cores"
    )

    started = time.perf_counter()
    report = run(str(photos), str(workdir / "dataset"), IngestConfig(workers=0))
    lorapipe_seconds = time.perf_counter() - started
    if report["kept"] != args.images:
        sys.exit(f"lorapipe kept {report['kept']} of {args.images} images: {report['drops']}")

    started = time.perf_counter()
    decoded = decode_loop(photos, workdir / "loop")
    loop_seconds = time.perf_counter() - started
    assert decoded == args.images

    lorapipe_rate = args.images / lorapipe_seconds
    loop_rate = args.images / loop_seconds
    print(f"{'variant':32} {'images/s':>9} {'seconds':>8}")
    print(f"{'lorapipe ingest (workers=0)':32} {lorapipe_rate:9.2f} {lorapipe_seconds:8.2f}")
    print(f"{'single-process decode loop':32} {loop_rate:9.2f} {loop_seconds:8.2f}")
    print(f"lorapipe / decode loop: {lorapipe_rate / loop_rate:.2f}x images/s")
    decoding, auditing = audit_cost(photos)
    print(
        f"quality audit: {1000 * auditing:.1f} ms per image, {100 * auditing / decoding:.0f} % of "
        f"decoding it ({1000 * decoding:.1f} ms)"
    )


def audit_cost(folder: Path) -> tuple[float, float]:
    """Mean seconds per file of decoding it (to upright RGB) and of measuring its quality."""
    from lorapipe import quality

    decoding = auditing = 0.0
    paths = sorted(folder.iterdir())
    for path in paths:
        started = time.perf_counter()
        with Image.open(path) as image:
            image.load()
            rgb = ImageOps.exif_transpose(image).convert("RGB")
            tables = image.quantization if image.format == "JPEG" else None
        decoded = time.perf_counter()
        quality.measure(rgb, tables)
        auditing += time.perf_counter() - decoded
        decoding += decoded - started
    return decoding / len(paths), auditing / len(paths)


def decode_loop(folder: Path, output: Path) -> int:
    """The minimal loop: decode, upright, RGB, hash, PNG. Returns how many it wrote."""
    output.mkdir()
    hashes = set()
    for path in sorted(folder.iterdir()):
        with Image.open(path) as image:
            image.load()
            rgb = ImageOps.exif_transpose(image).convert("RGB")
        hashes.add(hashlib.sha256(rgb.tobytes()).hexdigest())
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
        (output / f"{path.stem}.png").write_bytes(buffer.getvalue())
    return len(hashes)


def write_photos(folder: Path, count: int, width: int, height: int) -> None:
    """Smooth random colour fields (a coarse random grid upsampled bicubically, like the large
    areas of a photo) plus a brightness gradient and sensor-like grain; every one different."""
    folder.mkdir()
    generator = np.random.default_rng(0)
    for index in range(count):
        coarse = generator.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(field, dtype=np.float32)
        pixels *= np.linspace(0.7, 1.1, width, dtype=np.float32)[None, :, None]
        pixels += generator.normal(0, 6, (height, width, 1)).astype(np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if index % 4 == 3:
            image.save(folder / f"photo_{index:04d}.png")
        else:
            image.save(folder / f"photo_{index:04d}.jpg", quality=90)


if __name__ == "__main__":
    main()
