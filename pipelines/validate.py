"""Find the image files a training run cannot use, and write a clean file list.

    python -m cimfast.pipelines.validate ROOT [--max-pixels N] [--out LIST]

``ROOT`` is an image folder (ImageNet-style tree) or a file list. Every file
is opened and decoded once (JPEGs at 1/8 scale through libjpeg's DCT scaling,
which still reads every byte of the entropy-coded data, so truncation is
found); empty, truncated, corrupt, non-image and absurdly large files are left
out and counted. Grayscale, CMYK, palette and alpha images and files whose
name lies about the format (a PNG named ``.jpg``) decode fine and are kept.

The result of every file is cached by (path, size, mtime), so a second run
over the same tree only stats the files. The clean list has one
``PATH<TAB>WIDTH<TAB>HEIGHT<TAB>FORMAT`` line per good file (the DALI path
takes the sizes from it instead of parsing headers), and a JSON summary is
printed and written next to it.

Training runs this automatically for ``data_path`` (cached; several ranks on
one machine take turns through a file lock, the first one does the work).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

from cimfast.pipelines.atomic import write_text_atomically
from cimfast.pipelines.datasets import list_images
from cimfast.pipelines.demo import default_cache_dir

log = logging.getLogger("cimfast")

DEFAULT_MAX_PIXELS = 100_000_000  # 10,000 x 10,000: ImageNet's largest is about 12 M
CACHE_VERSION = 1
# PIL format names of the files DALI's decoders read (others are transcoded by the DALI source)
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})
BAD_STATUSES = ("empty", "truncated", "corrupt", "not_image", "too_large", "unreadable")


def check_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple:
    """(status, width, height, format, message) of one file; status "ok" or one of BAD_STATUSES."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.path.getsize(path)
    except OSError as e:
        return ("unreadable", 0, 0, "", str(e))
    if size == 0:
        return ("empty", 0, 0, "", "empty file")
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, without PIL's bomb warning or error
    try:
        with Image.open(path) as im:
            w, h = im.size
            fmt = im.format or ""
            if w <= 0 or h <= 0:
                return ("corrupt", w, h, fmt, "zero-sized image")
            if w * h > max_pixels:
                return ("too_large", w, h, fmt, f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
            if fmt in ("JPEG", "MPO"):
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
        return ("ok", w, h, fmt, "")
    except UnidentifiedImageError as e:
        return ("not_image", 0, 0, "", str(e))
    except Exception as e:  # OSError "image file is truncated", SyntaxError, ValueError, struct.error ...
        msg = f"{type(e).__name__}: {e}"
        low = msg.lower()
        status = "truncated" if ("truncated" in low or "premature" in low) else "corrupt"
        return (status, 0, 0, "", msg)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _check_many(args) -> list:
    paths, max_pixels = args
    return [check_file(p, max_pixels) for p in paths]


@dataclass
class Validation:
    files: list  # the good files (absolute paths), in the order of the listing
    info: list  # (height, width, format) per good file
    summary: dict
    clean_list: Optional[str] = None
    bad: list = field(default_factory=list)  # (path, status, message)


def _stat(path: str):
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


@contextmanager
def _locked(path: str):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tag(root: str) -> str:
    a = os.path.abspath(root)
    name = os.path.basename(a.rstrip("/")) or "root"
    return f"{name}-{hashlib.sha1(a.encode()).hexdigest()[:12]}"


def validate(root: str, max_pixels: int = DEFAULT_MAX_PIXELS, cache_dir: Optional[str] = None,
             out: Optional[str] = None, workers: Optional[int] = None, use_cache: bool = True) -> Validation:
    """Check every image of ``root`` (folder or file list); write the clean list
    (``out``, default ``<cache_dir>/<name>-<hash>.clean.txt``) and a summary
    JSON beside it. Results are cached per file by (path, size, mtime)."""
    t0 = time.perf_counter()
    files = [os.path.abspath(p) for p in list_images(root)]
    cache_dir = cache_dir or default_cache_dir()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        writable = os.access(cache_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        log.warning("validation: cache folder %s is not writable; using a temporary folder", cache_dir)
        cache_dir, use_cache = tempfile.mkdtemp(prefix="cimfast-validate-"), False
    tag = _tag(root)
    cache_path = os.path.join(cache_dir, f"{tag}.cache.json")
    out = out or os.path.join(cache_dir, f"{tag}.clean.txt")
    # reading needs no lock (the cache is replaced atomically); checking does: the first
    # process (rank) checks and writes, the others wait and then find the cache fresh
    entries = _load_cache(cache_path) if use_cache else {}
    stats, todo = _plan(files, entries, max_pixels)
    if todo:
        with (_locked(cache_path + ".lock") if use_cache else _nothing()):
            if use_cache:
                entries = _load_cache(cache_path)
                stats, todo = _plan(files, entries, max_pixels)
            results = _run_checks([files[i] for i in todo], max_pixels, workers)
            for i, r in zip(todo, results):
                entries[files[i]] = [stats[i][0], stats[i][1], *r]
            if use_cache and todo:
                keep = {p: entries[p] for p in files}  # forget files no longer listed
                write_text_atomically(cache_path, json.dumps({"version": CACHE_VERSION, "root": os.path.abspath(root),
                                                      "entries": keep}, separators=(",", ":")))
    good, info, bad = [], [], []
    for p in files:
        e = entries[p]
        if e[2] == "ok":
            good.append(p)
            info.append((int(e[4]), int(e[3]), e[5]))
        else:
            bad.append((p, e[2], e[6]))
    counts = Counter(s for _, s, _ in bad)
    summary = {
        "root": os.path.abspath(root), "total": len(files), "ok": len(good), "bad": len(bad),
        **{s: counts.get(s, 0) for s in BAD_STATUSES},
        "formats": dict(Counter(i[2] for i in info)), "checked": len(todo), "cached": len(files) - len(todo),
        "max_pixels": max_pixels, "clean_list": os.path.abspath(out), "seconds": round(time.perf_counter() - t0, 3),
        "bad_files": [{"path": p, "status": s, "message": m} for p, s, m in bad[:100]],
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_text_atomically(out, "".join(f"{p}\t{w}\t{h}\t{fmt}\n" for p, (h, w, fmt) in zip(good, info)))
    write_text_atomically(os.path.splitext(out)[0] + ".summary.json", json.dumps(summary, indent=1) + "\n")
    return Validation(good, info, summary, os.path.abspath(out), bad)


@contextmanager
def _nothing():
    yield


def _load_cache(path: str) -> dict:
    try:
        with open(path) as f:
            c = json.load(f)
        return c["entries"] if c.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _plan(files: list, entries: dict, max_pixels: int) -> tuple[list, list]:
    """(size, mtime) of every file, and the indices of the files to check."""
    stats = [_stat(p) for p in files]
    todo = []
    for i, (p, (size, mtime)) in enumerate(zip(files, stats)):
        e = entries.get(p)
        fresh = e is not None and e[0] == size and e[1] == mtime and size >= 0
        if fresh and e[2] == "too_large" and e[3] * e[4] <= max_pixels:
            fresh = False  # the limit was raised: decode it now
        if fresh and e[2] == "ok" and e[3] * e[4] > max_pixels:
            msg = f"{e[3]}x{e[4]} = {e[3] * e[4]} pixels > max_pixels {max_pixels}"
            entries[p] = [*e[:2], "too_large", *e[3:6], msg]
        if not fresh:
            todo.append(i)
    return stats, todo


def _run_checks(paths: list, max_pixels: int, workers: Optional[int]) -> list:
    if not paths:
        return []
    workers = workers if workers is not None else min(32, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 512:
        return _check_many((paths, max_pixels))
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    chunk = max(64, min(1024, len(paths) // (workers * 8) + 1))
    parts = [(paths[i:i + chunk], max_pixels) for i in range(0, len(paths), chunk)]
    log.info("validation: checking %d files with %d processes", len(paths), workers)
    # spawn: safe after CUDA was initialized in the parent
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        return [r for part in ex.map(_check_many, parts) for r in part]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cimfast.pipelines.validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="image folder (ImageNet-style tree) or file list")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help=f"larger images (width x height) are left out (default {DEFAULT_MAX_PIXELS})")
    ap.add_argument("--out", help="clean file list to write (default: in the cache folder)")
    ap.add_argument("--cache-dir", help=f"cache folder (default {default_cache_dir()})")
    ap.add_argument("--workers", type=int, help="decoding processes (default: the CPU count, at most 32)")
    ap.add_argument("--no-cache", action="store_true", help="check every file again")
    ap.add_argument("--list-bad", action="store_true", help="also print every bad file, one per line, to stderr")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        v = validate(a.root, a.max_pixels, a.cache_dir, a.out, a.workers, use_cache=not a.no_cache)
    except FileNotFoundError as e:
        print(f"cimfast.pipelines.validate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(v.summary, indent=1))
    if a.list_bad:
        for p, s, m in v.bad:
            print(f"{s}\t{p}\t{m}", file=sys.stderr)
    return 0 if v.files else 1


if __name__ == "__main__":
    sys.exit(main())
