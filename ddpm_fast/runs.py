"""Sampling runs that survive interruption.

A run of N images is cut into fixed chunks of global indices [k*K, min((k+1)*K, N)).  Image i depends only
on (seed, i), so any process may compute any chunk, at any batch size, and a run can stop anywhere and go
on later.  DIR holds:

    run.json                   what the images are: model hash, seed, steps, schedule, dtype, shape, N, K
    chunks/00000000-00000999.npz  + .sha256   uint8 NHWC images of one chunk and its digest
    samples.npz, samples.sha256, grid.png     assembled once every chunk is there

Every file is written to a temporary name in its directory, fsynced and renamed, so a kill leaves either
the old state or the new one.  A chunk counts as done only when its .sha256 sidecar (written after it)
matches its bytes and it loads with the right shape.  Sidecars are per chunk, so processes never write
one shared file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import threading
import zipfile
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

FORMAT = 1
MANIFEST, CHUNKS, SAMPLES, DIGEST, GRID = "run.json", "chunks", "samples.npz", "samples.sha256", "grid.png"
# The manifest fields that fix the images, in the order they are checked, and the option that sets each.
IDENTITY = {"model": "--model", "seed": "--seed", "steps": "--steps", "dtype": "--dtype", "schedule": "--model",
            "sampling": "--model", "sample_shape": "--model", "num_images": "--num-images",
            "chunk_size": "--chunk-size", "parallel": "--parallel-window"}
# A fixed zip timestamp: the same images give the same bytes, so one sha256 names them.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")


class RunMismatch(ValueError):
    """DIR holds a run of other images; ``field`` is the manifest field and ``option`` the CLI option."""

    def __init__(self, field: str, option: str, message: str):
        super().__init__(message)
        self.field, self.option = field, option


class ChunkError(ValueError):
    """A chunk is missing or does not match its digest or the manifest."""


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ------------------------------------------------------------------------------------------------ hashing
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_digest(path: str) -> str:
    """sha256 of a checkpoint file; for a diffusers directory, of its weight and config files (relative
    path and content, in sorted order), so the same model gives the same digest wherever it lies."""
    if os.path.isfile(path):
        return sha256_file(path)
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
                   if f.endswith(_WEIGHT_SUFFIXES))
    h = hashlib.sha256()
    for rel in files:
        h.update(f"{rel.replace(os.sep, '/')}\0{sha256_file(os.path.join(path, rel))}\n".encode())
    return h.hexdigest()


def schedule_id(schedule) -> dict:
    betas = schedule.betas.double().numpy().astype("<f8")
    return {"num_timesteps": int(betas.size), "betas_sha256": hashlib.sha256(betas.tobytes()).hexdigest()}


def manifest(*, model_path: str, seed: int, steps: int, schedule, sampling: dict, dtype: str,
             sample_shape: Sequence[int], num_images: int, chunk_size: int, version: str,
             parallel: Optional[dict] = None) -> dict:
    return {"format": FORMAT, "ddpm_fast": version,
            "model": {"path": os.path.abspath(model_path), "sha256": model_digest(model_path)},
            "seed": int(seed), "steps": int(steps), "dtype": dtype, "schedule": schedule_id(schedule),
            "sampling": {k: sampling[k] for k in sorted(sampling)}, "sample_shape": [int(s) for s in sample_shape],
            "num_images": int(num_images), "chunk_size": int(chunk_size),
            # parallel-in-time sampling changes the images (within its tolerance): part of what they are
            "parallel": parallel}


# ----------------------------------------------------------------------------------------- atomic files
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """write(f) into a temporary file beside path, fsync it, rename it over path, fsync the directory.
    On any exception (an interrupt included) the temporary file is removed and path is untouched."""
    d, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(d)


def write_npz(f, shape: Sequence[int], parts: Iterable[np.ndarray]) -> None:
    """An .npz with one uint8 array arr_0 of ``shape`` (what np.savez writes, np.load reads), streamed
    from ``parts`` in order: only one part is in memory at a time."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(zipfile.ZipInfo("arr_0.npy", date_time=_ZIP_TIME), "w", force_zip64=True) as m:
            np.lib.format.write_array_header_1_0(m, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
            written = 0
            for p in parts:
                p = np.ascontiguousarray(p)
                if p.dtype != np.uint8 or p.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"parts: expected uint8 [*, {', '.join(map(str, shape[1:]))}], "
                                     f"got {p.dtype} {list(p.shape)}")
                m.write(p.data.cast("B"))
                written += p.shape[0]
            if written != shape[0]:
                raise ValueError(f"parts: expected {shape[0]} images in all, got {written}")


def _read_npy_stream(path: str) -> Tuple[Tuple[int, ...], np.dtype, zipfile.ZipExtFile, zipfile.ZipFile]:
    zf = zipfile.ZipFile(path)
    m = zf.open("arr_0.npy")
    version = np.lib.format.read_magic(m)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(m)
    if fortran:
        raise ValueError("arr_0 is in Fortran order")
    return shape, dtype, m, zf


# ------------------------------------------------------------------------------------------------ signals
@contextlib.contextmanager
def interruptible():
    """SIGINT and SIGTERM raise Interrupted in the main thread, so the work in flight unwinds (its
    temporary files removed) and the caller can say how to resume; the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM over a few renames that belong together; they are delivered after."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


# -------------------------------------------------------------------------------------------------- a run
class Run:
    """The chunked run in ``out`` described by the manifest ``spec``."""

    def __init__(self, out: str, spec: dict):
        self.out, self.spec = out, spec
        n, k = spec["num_images"], spec["chunk_size"]
        self.ranges = [(a, min(a + k, n)) for a in range(0, n, k)]
        width = max(8, len(str(n - 1)))
        self.names = [f"{a:0{width}d}-{b - 1:0{width}d}" for a, b in self.ranges]
        c, h, w = spec["sample_shape"]
        self.image_shape = (h, w, c)  # NHWC, as FID tools read it

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def chunk_path(self, k: int, suffix: str = ".npz") -> str:
        return self.path(CHUNKS, self.names[k] + suffix)

    # ---------------------------------------------------------------- manifest
    @staticmethod
    def read_manifest(out: str) -> dict:
        path = os.path.join(out, MANIFEST)
        try:
            with open(path) as f:
                spec = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist: {out!r} holds no sampling run") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} cannot be read ({e})") from None
        if not isinstance(spec, dict) or spec.get("format") != FORMAT or any(f not in spec for f in IDENTITY):
            raise ValueError(f"{path} is not a ddpm-fast run manifest (format {FORMAT})")
        return spec

    def check_against(self, old: dict) -> None:
        """Raise RunMismatch naming the first field where the manifest ``old`` describes other images."""
        for field, option in IDENTITY.items():
            mine, theirs = self.spec[field], old.get(field)
            if field == "model":
                mine, theirs = mine["sha256"], (theirs or {}).get("sha256")
            if mine != theirs:
                what = {"model": "the model's weights (sha256)"}.get(field, field)
                raise RunMismatch(field, option, f"{option}: {what} differ{'' if field == 'model' else 's'} from "
                                  f"the run in {self.out} ({json.dumps(mine)} here, {json.dumps(theirs)} in "
                                  f"{MANIFEST}); resume with the same value, pass --restart to discard its "
                                  "chunks, or choose another --out")

    def prepare(self, restart: bool = False) -> List[int]:
        """Check (or start) the run in out and return the chunks still to compute.  A run of other images
        raises RunMismatch before anything in out changes.  Invalid chunks and stale temporary files
        are removed."""
        manifest_path = self.path(MANIFEST)
        if not restart:
            if os.path.exists(manifest_path):
                self.check_against(self.read_manifest(self.out))
            elif os.path.isdir(self.path(CHUNKS)) and os.listdir(self.path(CHUNKS)):
                raise RunMismatch("manifest", "--out", f"--out: {self.path(CHUNKS)} holds files but there is no "
                                  f"{manifest_path} to say what they are; pass --restart to discard them")
        os.makedirs(self.path(CHUNKS), exist_ok=True)
        if restart:
            self._discard()
        for name in os.listdir(self.path(CHUNKS)):
            if name.startswith(".") and name.endswith(".tmp"):  # left by a killed writer
                os.remove(self.path(CHUNKS, name))
        if not os.path.exists(manifest_path):
            atomic_write(manifest_path, lambda f: f.write((json.dumps(self.spec, indent=1) + "\n").encode()))
        todo = []
        for k in range(len(self.ranges)):
            if self.chunk_problem(k) is not None:
                for suffix in (".npz", ".sha256"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.chunk_path(k, suffix))
                todo.append(k)
        return todo

    def _discard(self) -> None:
        for name in os.listdir(self.path(CHUNKS)):
            if name.endswith((".npz", ".sha256", ".tmp")):
                os.remove(self.path(CHUNKS, name))
        for name in (MANIFEST, SAMPLES, DIGEST, GRID):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path(name))

    def discard_if_empty(self, remove_out: bool) -> None:
        """Undo prepare() of a new run that wrote no chunk: its manifest and chunks/, and out itself where
        remove_out (a directory the caller created) and nothing else is in it."""
        if any(n.endswith(".npz") for n in os.listdir(self.path(CHUNKS))):
            return
        self._discard()
        for d in (self.path(CHUNKS), self.out) if remove_out else (self.path(CHUNKS),):
            with contextlib.suppress(OSError):
                os.rmdir(d)

    # ------------------------------------------------------------------ chunks
    def write_chunk(self, k: int, images: np.ndarray) -> None:
        a, b = self.ranges[k]
        if images.shape != (b - a, *self.image_shape) or images.dtype != np.uint8:
            raise ValueError(f"images: expected uint8 {[b - a, *self.image_shape]}, got {images.dtype} "
                             f"{list(images.shape)}")
        path = self.chunk_path(k)
        tmp, side_tmp = (self.path(CHUNKS, f".{self.names[k]}{s}.{os.getpid()}.tmp") for s in (".npz", ".sha256"))
        try:
            with open(tmp, "wb") as f:
                write_npz(f, images.shape, [images])
                f.flush()
                os.fsync(f.fileno())
            digest = sha256_file(tmp)
            with open(side_tmp, "wb") as f:
                f.write(f"{digest}  {os.path.basename(path)}\n".encode())
                f.flush()
                os.fsync(f.fileno())
            with _signals_deferred():  # the chunk, then its sidecar: a chunk without one is redone
                os.replace(tmp, path)
                os.replace(side_tmp, self.chunk_path(k, ".sha256"))
        except BaseException:
            for p in (tmp, side_tmp):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
            raise
        _fsync_dir(self.path(CHUNKS))

    def has_chunk(self, k: int) -> bool:
        """Cheap: the sidecar is there (it is written after its chunk)."""
        return os.path.exists(self.chunk_path(k, ".sha256"))

    def chunk_problem(self, k: int) -> Optional[str]:
        """None for a chunk that matches its digest and the manifest, else what is wrong with it."""
        try:
            self.load_chunk(k)
        except ChunkError as e:
            return str(e)
        return None

    def load_chunk(self, k: int) -> np.ndarray:
        """Chunk k's images, uint8 [n, H, W, C], after checking its digest, shape and dtype."""
        path = self.chunk_path(k)
        name = os.path.join(CHUNKS, os.path.basename(path))
        if not os.path.exists(path):
            raise ChunkError(f"{name}: missing")
        try:
            with open(self.chunk_path(k, ".sha256")) as f:
                want = f.read().split()[0]
        except (OSError, IndexError):
            raise ChunkError(f"{name}: no digest ({os.path.basename(self.chunk_path(k, '.sha256'))})") from None
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            raise ChunkError(f"{name}: missing") from None
        if hashlib.sha256(data).hexdigest() != want:
            raise ChunkError(f"{name}: its sha256 does not match its digest (truncated or changed)")
        try:
            with np.load(io.BytesIO(data)) as z:
                images = z["arr_0"]
        except Exception as e:  # a zip, npy or pickle error: whatever it is, the chunk is not trusted
            raise ChunkError(f"{name}: cannot be read ({type(e).__name__}: {e})") from None
        a, b = self.ranges[k]
        if images.dtype != np.uint8 or images.shape != (b - a, *self.image_shape):
            raise ChunkError(f"{name}: holds {images.dtype} {list(images.shape)}, expected uint8 "
                             f"{[b - a, *self.image_shape]}")
        return images

    def done_images(self, todo: Iterable[int]) -> int:
        return self.spec["num_images"] - sum(self.ranges[k][1] - self.ranges[k][0] for k in todo)

    # ---------------------------------------------------------------- the end
    def assemble(self, grid_count: int = 64) -> str:
        """Stream every chunk into samples.npz (checking each), then samples.sha256 and grid.png, each
        atomically.  Returns the digest of samples.npz."""
        from .io import image_grid, save_png

        first: List[np.ndarray] = []

        def parts() -> Iterator[np.ndarray]:
            for k in range(len(self.ranges)):
                images = self.load_chunk(k)
                if sum(len(x) for x in first) < grid_count:
                    first.append(images[:grid_count].copy())
                yield images

        shape = (self.spec["num_images"], *self.image_shape)
        atomic_write(self.path(SAMPLES), lambda f: write_npz(f, shape, parts()))
        digest = sha256_file(self.path(SAMPLES))
        atomic_write(self.path(DIGEST), lambda f: f.write(f"{digest}  {SAMPLES}\n".encode()))
        import torch

        grid = image_grid(torch.from_numpy(np.concatenate(first)[:grid_count]))
        atomic_write(self.path(GRID), lambda f: save_png(grid, f, scale=max(1, 512 // (self.image_shape[0] * 8))))
        return digest


def verify(out: str, check_model: bool = True) -> Tuple[List[str], List[str]]:
    """Re-check a run in out against its manifest: every chunk against its digest, shape and dtype, and
    samples.npz against samples.sha256 and, image for image, against the chunks.  Returns (what was
    checked, problems); the run is sound when problems is empty.  Reads one chunk at a time."""
    spec = Run.read_manifest(out)
    run = Run(out, spec)
    checked, problems = [], []
    bad = [p for p in (run.chunk_problem(k) for k in range(len(run.ranges))) if p is not None]
    problems += bad
    checked.append(f"{len(run.ranges) - len(bad)} of {len(run.ranges)} chunks match their digests and {MANIFEST} "
                   f"({spec['num_images']} images, {' x '.join(map(str, run.image_shape))} uint8)")
    samples = run.path(SAMPLES)
    if not os.path.exists(samples):
        problems.append(f"{SAMPLES}: missing (run the same `ddpm-fast sample` command to finish the run)")
    else:
        digest = sha256_file(samples)
        try:
            with open(run.path(DIGEST)) as f:
                want = f.read().split()[0]
        except (OSError, IndexError):
            want = None
        if want != digest:
            problems.append(f"{SAMPLES}: its sha256 {digest} does not match {DIGEST} ({want})")
        problems += _compare_samples(run, samples, bad)
        if not problems:
            checked.append(f"{SAMPLES} matches {DIGEST} ({digest}) and the chunks, image for image")
    model = spec["model"]
    if check_model:
        if not os.path.exists(model["path"]):
            checked.append(f"model not checked: {model['path']} is not here")
        elif model_digest(model["path"]) != model["sha256"]:
            problems.append(f"model: {model['path']} has changed since the run (its sha256 is no longer "
                            f"{model['sha256']})")
        else:
            checked.append(f"model {model['path']} still has sha256 {model['sha256']}")
    return checked, problems


def _compare_samples(run: Run, samples: str, bad_chunks: List[str]) -> List[str]:
    try:
        shape, dtype, member, zf = _read_npy_stream(samples)
    except Exception as e:  # not a zip, no arr_0, a broken header
        return [f"{SAMPLES}: cannot be read ({type(e).__name__}: {e})"]
    with zf, member:
        want = (run.spec["num_images"], *run.image_shape)
        if dtype != np.uint8 or tuple(shape) != want:
            return [f"{SAMPLES}: holds {dtype} {list(shape)}, expected uint8 {list(want)}"]
        if bad_chunks:
            return []
        for k, (a, b) in enumerate(run.ranges):
            expected = run.load_chunk(k)
            got = member.read(expected.nbytes)
            if got != expected.tobytes():
                return [f"{SAMPLES}: images {a}..{b - 1} differ from {os.path.join(CHUNKS, run.names[k])}.npz"]
        if member.read(1):
            return [f"{SAMPLES}: holds more bytes than {want[0]} images"]
    return []
