"""Images as data: decoding any image file to an upright uint8 RGB array, a labelled set of them as (N, 3, H, W)
uint8 images, and the decoded store on disk that sets too big for memory are read from.

A store is one file per decoded dataset: the images as raw uint8 rows from offset 0 (read a batch at a time
through the OS page cache, so nothing needs to fit in RAM, and what fits stays cached between runs), then the
int64 labels, then a JSON header (shape, splits, class names), its length and a magic tag. It is written by
streaming images into it in order (StoreWriter: never all of them in memory) and renamed into place only when
complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
STORE_SUFFIX = ".store"
_MAGIC = b"TBSTORE1"
_TAIL = struct.Struct("<Q8s")  # header length, magic


@dataclass
class ImageSet:
    images: "torch.Tensor | DiskImages"  # uint8 (N, 3, H, W): in memory, or rows of a store on disk
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | np.ndarray) -> "ImageSet":
        """The rows `index`; a store's rows stay on disk (only the index is kept), a tensor's are copied."""
        index = torch.as_tensor(index, dtype=torch.long)
        images = self.images.subset(index) if isinstance(self.images, DiskImages) else self.images[index]
        return ImageSet(images, self.labels[index], self.classes)


# ---------------------------------------------------------------------------------------------- store

class Store:
    """An open store file: its labels and header in memory, its images on disk, read row by row on demand.

    Rows are read with positional reads (pread) straight into the batch: the OS page cache keeps what fits in RAM
    and serves it again at memory speed, and nothing counts as the process's own memory. (Gathering random rows
    through a memory map instead maps the page cache into the process: on Linux 6.18 with ext4's large folios, 64
    random rows of 150 KB put 97 MB into its resident set. pread is also faster: 0.9 vs 1.2-1.7 ms per batch of
    128 such rows.) `array` is the same bytes as a read-only numpy memmap, for whole-array use.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _TAIL.size:
                raise ValueError(f"{size} bytes is too short for a store")
            f.seek(size - _TAIL.size)
            header_len, magic = _TAIL.unpack(f.read(_TAIL.size))
            if magic != _MAGIC or header_len > size - _TAIL.size:
                raise ValueError("not a transferbench store (bad tail)")
            f.seek(size - _TAIL.size - header_len)
            self.header: dict[str, Any] = json.loads(f.read(header_len))
            n, c, h, w = self.shape = tuple(int(v) for v in self.header["shape"])
            self.row_bytes = c * h * w
            image_bytes = n * self.row_bytes
            if size != image_bytes + 8 * n + header_len + _TAIL.size:
                raise ValueError(f"{size} bytes, expected {image_bytes + 8 * n + header_len + _TAIL.size} for {n} "
                                 f"images of {c}x{h}x{w}")
            f.seek(image_bytes)
            self.labels = np.frombuffer(f.read(8 * n), dtype="<i8").astype(np.int64)
        self.nbytes = size
        self._file = open(self.path, "rb", buffering=0)  # kept open: the store stays readable if it is replaced
        self._lock = threading.Lock()  # for systems without os.preadv (seek + read)
        self._array: np.ndarray | None = None

    def __del__(self):
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()

    @property
    def splits(self) -> dict[str, dict]:
        return self.header["splits"]

    @property
    def array(self) -> np.ndarray:
        """All images as a read-only (N, 3, H, W) numpy memmap (pages touched count as resident while mapped)."""
        if self._array is None:
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)
        return self._array

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """Rows copied from disk (through the page cache) into a new tensor, in the order asked; each run of
        consecutive rows is one read."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows outside 0..{self.shape[0] - 1}")
        flat = out.reshape(len(rows), -1)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
            self._read_into(flat[a:b], int(rows[a]) * self.row_bytes)
        return torch.from_numpy(out)

    def _read_into(self, buffer: np.ndarray, offset: int) -> None:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            if hasattr(os, "preadv"):
                got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            else:
                with self._lock:
                    self._file.seek(offset + done)
                    got = self._file.readinto(view[done:])
            if not got:
                raise UserError(f"the decoded store {self.path} ended early (it was truncated while in use); run "
                                f"again to rebuild it")
            done += got

    def images(self, start: int = 0, stop: int | None = None) -> "DiskImages":
        stop = self.shape[0] if stop is None else stop
        return DiskImages(self, np.arange(start, stop, dtype=np.int64))

    def split_sets(self) -> dict[str, ImageSet]:
        """Every split the header names, as ImageSets whose images stay on disk."""
        out = {}
        for key, split in self.splits.items():
            start, stop = split["rows"]
            out[key] = ImageSet(self.images(start, stop), torch.from_numpy(self.labels[start:stop].copy()),
                                list(split["classes"]))
        return out


def open_store(path: Path) -> Store | None:
    """The store at path, or None (with a warning, the file removed) when it is unreadable: a cache is rebuilt,
    never trusted blindly and never fatal."""
    try:
        return Store(path)
    except Exception as err:
        log.warning(f"cache file {path} is unreadable ({type(err).__name__}: {err}); rebuilding it")
        Path(path).unlink(missing_ok=True)
        return None


class DiskImages:
    """Rows of a store, read on demand: as much of a uint8 (N, 3, H, W) tensor as the library needs. Indexing
    (an int, a slice, an index or mask tensor or array, optionally followed by more indices) returns an
    in-memory tensor of just those rows; `subset` narrows the rows without reading anything."""

    dtype = torch.uint8
    device = torch.device("cpu")
    ndim = 4

    def __init__(self, store: Store, rows: np.ndarray):
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.store.shape[1:]))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.numel()

    def __repr__(self) -> str:
        return f"DiskImages({tuple(self.shape)}, store={self.store.path})"

    def _rows(self, key) -> np.ndarray | int:
        if isinstance(key, (int, np.integer)):
            return int(self.rows[key])
        if isinstance(key, slice):
            return self.rows[key]
        if isinstance(key, torch.Tensor):
            key = key.detach().cpu().numpy()
        key = np.asarray(key)
        if key.ndim == 0 and key.dtype.kind in "iu":  # a 0-d index, like an int
            return int(self.rows[int(key)])
        if key.dtype == bool:
            if key.shape != self.rows.shape:
                raise IndexError(f"a mask of shape {key.shape} for {len(self.rows)} rows")
            return self.rows[key]
        if key.dtype.kind not in "iu":
            raise IndexError(f"cannot index DiskImages with {key.dtype}")
        return self.rows[key.reshape(-1)]

    def subset(self, index) -> "DiskImages":
        rows = self._rows(index)
        return DiskImages(self.store, np.atleast_1d(rows))

    def __getitem__(self, key) -> torch.Tensor:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
            if key is Ellipsis:
                key, rest = slice(None), (Ellipsis, *rest)
        rows = self._rows(key)
        out = self.store.read(np.array([rows])).squeeze(0) if isinstance(rows, int) else self.store.read(rows)
        if rest:
            out = out[(slice(None), *rest)] if not isinstance(rows, int) else out[rest]
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.rows), 256):
            yield from self.store.read(self.rows[start:start + 256])

    def chunks(self, rows: int = 256) -> Iterator[torch.Tensor]:
        """The images in order, `rows` at a time."""
        for start in range(0, len(self.rows), rows):
            yield self.store.read(self.rows[start:start + rows])

    def materialize(self) -> torch.Tensor:
        """All rows as one in-memory tensor."""
        return self.store.read(self.rows)

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> torch.Tensor:
        """In memory on `device`; filled chunk by chunk, so a copy to an accelerator never holds all rows in
        host memory at once."""
        device = torch.device(device) if device is not None else self.device
        out = torch.empty(tuple(self.shape), dtype=torch.uint8, device=device)
        start = 0
        for chunk in self.chunks(1024):
            out[start:start + len(chunk)].copy_(chunk, non_blocking=False)
            start += len(chunk)
        return out if dtype is None else out.to(dtype)

    # Tensor methods that code written for in-memory images calls before hashing its bytes (features.py's key):
    # all rows, in memory. update_hash below gives the same digest without holding them.
    def detach(self) -> torch.Tensor:
        return self.materialize()

    def cpu(self) -> torch.Tensor:
        return self.materialize()

    def contiguous(self) -> torch.Tensor:
        return self.materialize()


def update_hash(h, images: "torch.Tensor | DiskImages", rows: int = 256) -> None:
    """h.update with dtype, shape and every byte of `images`, a chunk at a time: the same digest for a tensor
    and for a store's rows holding the same pixels, and never all of a store's rows in memory at once."""
    h.update(f"{images.dtype}{(images.numel(),)}".encode())  # as hashing the flattened tensor does
    for start in range(0, len(images), rows):
        chunk = images[start:start + rows]
        chunk = chunk.detach().cpu().contiguous()
        h.update(chunk.reshape(-1).view(torch.uint8).numpy().data if chunk.numel() else b"")


def as_tensor(images: "torch.Tensor | DiskImages") -> torch.Tensor:
    return images.materialize() if isinstance(images, DiskImages) else images


class StoreWriter:
    """Images streamed in order into a new store at `path` (or, with path None, into one in-memory tensor), split
    by split: begin(split, classes), then add(...) as images come. finish() renames the complete file into place
    and returns the splits; leaving the context early removes the partial file.
    """

    def __init__(self, path: Path | None, n: int, chw: tuple[int, int, int], meta: dict | None = None):
        self.path, self.n, self.chw = (Path(path) if path else None), int(n), tuple(int(v) for v in chw)
        self.meta = dict(meta or {})
        self.row = 0
        self.labels = np.empty(self.n, dtype=np.int64)
        self.splits: dict[str, dict] = {}
        self._current: str | None = None
        if self.path is None:
            self.tensor = torch.empty((self.n, *self.chw), dtype=torch.uint8)
            self._array = self.tensor.numpy()
            self._file = None
            return
        self.need = self.n * int(np.prod(self.chw)) + 9 * self.n
        free = shutil.disk_usage(self.path.parent).free
        if self.need > free:
            raise UserError(f"the decoded images ({self.n:,} of {'x'.join(map(str, self.chw))}) need "
                            f"{human_bytes(self.need)} in {self.path.parent}, which has {human_bytes(free)} free: free "
                            f"space there, point TRANSFERBENCH_CACHE elsewhere, or lower --image-size (the size images "
                            f"of mixed sizes are stored at)")
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        _sweep(self.path.parent)
        self._file = self._io(lambda: open(self.tmp, "wb", buffering=8 << 20))

    def _io(self, action: Callable):
        """A write to the store: a full disk or a vanished directory is one clear message, not a traceback."""
        try:
            return action()
        except OSError as err:
            raise UserError(f"cannot write the decoded images to {self.tmp} ({err.strerror or err}); they need "
                            f"{human_bytes(self.need)}: free space there or point TRANSFERBENCH_CACHE "
                            f"elsewhere") from None

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            if exc_type is not None:
                self.tmp.unlink(missing_ok=True)

    def begin(self, key: str, classes: list[str]) -> None:
        self._end()
        self.splits[key] = {"rows": [self.row, self.row], "classes": list(classes)}
        self._current = key

    def _end(self) -> None:
        if self._current is not None:
            self.splits[self._current]["rows"][1] = self.row

    def add(self, images: np.ndarray | torch.Tensor, labels) -> None:
        """A block of (k, 3, H, W) images, or one (3, H, W) image, and its label(s)."""
        if isinstance(images, torch.Tensor):
            images = images.numpy()
        if images.ndim == 3:
            images, labels = images[None], [labels]
        k = len(images)
        if tuple(images.shape[1:]) != self.chw or images.dtype != np.uint8:
            raise ValueError(f"images of shape {tuple(images.shape[1:])} {images.dtype}, expected {self.chw} uint8")
        if self.row + k > self.n:
            raise ValueError(f"more than the {self.n} images announced")
        if self._file is None:
            self._array[self.row:self.row + k] = images
        else:
            self._io(lambda: self._file.write(np.ascontiguousarray(images).data))
        self.labels[self.row:self.row + k] = np.asarray(labels, dtype=np.int64).reshape(k)
        self.row += k

    def add_hwc(self, image: np.ndarray, label: int) -> None:
        """One decoded (H, W, 3) image (what image_array returns)."""
        self.add(image.transpose(2, 0, 1), label)

    def finish(self) -> dict[str, ImageSet]:
        self._end()
        if self.row != self.n:
            raise ValueError(f"{self.row} images written, {self.n} announced")
        if self._file is None:
            return {key: ImageSet(self.tensor[s["rows"][0]:s["rows"][1]],
                                  torch.from_numpy(self.labels[s["rows"][0]:s["rows"][1]].copy()), list(s["classes"]))
                    for key, s in self.splits.items()}
        header = json.dumps({"version": 1, "shape": [self.n, *self.chw], "splits": self.splits, **self.meta}).encode()

        def close() -> None:
            self._file.write(self.labels.astype("<i8").tobytes())
            self._file.write(header)
            self._file.write(_TAIL.pack(len(header), _MAGIC))
            self._file.close()

        self._io(close)
        self._file = None
        self._io(lambda: os.replace(self.tmp, self.path))
        return Store(self.path).split_sets()


def _sweep(folder: Path, idle_s: float = 3600.0) -> None:
    """Remove partial stores left by killed processes: a store being written grows every second; one untouched
    for an hour is abandoned (its process may be on another machine sharing the cache, so no pid is trusted)."""
    now = time.time()
    for tmp in folder.glob(f".*{STORE_SUFFIX}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > idle_s:
                tmp.unlink()
                log.info(f"removed {tmp}, a decoded store left unfinished by a process that stopped")
        except OSError:
            pass


def store_path(root: Path, key_parts: Iterable[Any], listing: bytes = b"") -> Path:
    """A content-keyed store file under root: the same inputs always name the same file."""
    h = hashlib.sha256("|".join(str(p) for p in key_parts).encode())
    h.update(listing)
    return root / f"{h.hexdigest()[:24]}{STORE_SUFFIX}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


# ---------------------------------------------------------------------------------------- decoding

def ordered_map(fn: Callable, items: Iterable, workers: int, window: int | None = None) -> Iterator:
    """fn over items on a thread pool, results in order, with at most `window` in flight: decoded images are
    consumed (written) as they come instead of piling up. A failure cancels everything queued behind it."""
    workers = max(1, workers)
    window = window or 4 * workers
    items = iter(items)
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(fn, item) for item in islice(items, window))
        try:
            while pending:
                result = pending.popleft().result()
                for item in islice(items, 1):
                    pending.append(pool.submit(fn, item))
                yield result
        finally:
            for future in pending:
                future.cancel()


def progress_bar(total: int | None, desc: str, progress: bool, unit: str = "img", **kwargs):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, disable=not progress,
                dynamic_ncols=True, **kwargs)


def image_array(im, size: int | None) -> np.ndarray:
    """A PIL image as an (H, W, 3) uint8 RGB array, upright, at size x size when size is given.

    EXIF orientation is applied (phones store portrait photos sideways); 16-bit and float images are
    scaled to 8 bits by their range, not clipped (PIL's convert("RGB") turns 16-bit mid-grey white);
    palette, grayscale and alpha images become RGB. Resizing is shorter side to `size`, then a centre
    crop: the torchvision eval convention.
    """
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            top = 65535.0
        elif im.mode == "I":  # how PIL opens some 16-bit files: 8-bit data stays 8-bit
            top = 65535.0 if arr.max() > 255 else 255.0
        else:  # "F": [0, 1] floats, or any other range by its maximum
            top = max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    im = im.convert("RGB")
    if size is not None and im.size != (size, size):
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top_ = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top_, left + size, top_ + size))
    return np.asarray(im, dtype=np.uint8)


def decode_file(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return image_array(im, size)
    except Exception as err:
        raise UserError(f"cannot read image {path} ({type(err).__name__}: {err}); fix or remove the file") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as decoded: after the EXIF rotation image_array applies."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)  # 90-degree orientations
    except Exception as err:
        raise UserError(f"cannot read image {path} ({type(err).__name__}: {err}); fix or remove the file") from None


def probe_bytes(data: bytes, where: str) -> tuple[tuple[int, int], str]:
    """(width, height) as decoded (after the EXIF rotation) and a digest of the encoded bytes, reading only
    the header of the image."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            size = (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)  # 90-degree orientations
    except Exception as err:
        raise UserError(f"cannot read image {where} ({type(err).__name__}: {err}); fix or remove the file") from None
    return size, hashlib.blake2b(data, digest_size=16).hexdigest()


def probe_file(path: Path) -> tuple[tuple[int, int], str]:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read image {path} ({err.strerror or err}); fix or remove the file") from None
    return probe_bytes(data, str(path))


def decode_bytes(data: bytes, size: int | None, where: str) -> np.ndarray:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return image_array(im, size)
    except Exception as err:
        raise UserError(f"cannot read image {where} ({type(err).__name__}: {err}); fix or remove the file") from None


def load_cached(path: Path, key: str, rows: int) -> torch.Tensor | None:
    """A tensor from a cache file, or None (with a warning, the file removed) when the file is unreadable
    or does not hold `rows` rows: a cache is rebuilt, never trusted blindly and never fatal."""
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)[key]
        if not isinstance(tensor, torch.Tensor) or len(tensor) != rows:
            raise ValueError(f"expected {rows} rows")
        return tensor
    except Exception as err:
        log.warning(f"cache file {path} is unreadable ({type(err).__name__}: {err}); rebuilding it")
        path.unlink(missing_ok=True)
        return None


