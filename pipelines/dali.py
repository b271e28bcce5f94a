"""The DALI input pipeline: the same batches as ``TwoViewDataset`` + ``EpochSampler``,
decoded by DALI (on the GPU with ``device="gpu"``, on the CPU otherwise).

How a batch is made (global micro-step ``s`` of rank ``r``):

1. A Python source (``DaliSource``, stateless and picklable, so it can also
   run in DALI's worker processes) is asked for pipeline iteration ``i`` and
   computes ``s = start_step + i``, ``(epoch, indices) =
   EpochSampler.step_indices(s)`` (cimfast's seeded permutation per epoch,
   rank slice of the global batch), reads the files' bytes and derives each
   sample's crop and flip, sampling key and mask with ``views.sample_crop``,
   ``views.sample_key`` and ``views.sample_mask`` -- exactly as
   ``TwoViewDataset`` does. The image size comes from the
   validation's clean list (no header parsing) or, without one, from the file
   header (PIL reads only the header). Absolute integer crop coordinates keep
   the crop identical to the torch path's, which a relative crop on
   ``fn.peek_image_shape`` would not (``crop_params`` rounds and rejects
   candidates against the integer size).
2. ``fn.decoders.image_slice`` decodes only the crop (``"mixed"``: nvJPEG on
   the GPU; ``"cpu"``: libjpeg-turbo, ROI decoding), EXIF orientation ignored
   like the torch path.
3. ``fn.resize`` twice (enhancer size, tokenizer size; bilinear with
   antialiasing, uint8 like the torch path) and ``fn.crop_mirror_normalize``
   applies the one shared flip and gives uint8 CHW (floats are made on the
   training device, as for the torch path).

Nothing depends on DALI's own random state, on thread or worker counts, or on
how many batches were made before: a resumed run rebuilds the pipeline with
``start_step`` and gets the same batches.

A file DALI cannot decode (DALI has no skip option; the error invalidates the
pipeline) never stops the run: the batches around the failure are checked
file by file, a file PIL decodes is from then on handed to DALI transcoded
(PPM), a file nothing decodes is replaced by the next index whose file
decodes (the torch path's rule), and the pipeline is rebuilt at the failing
step. If that does not help, the remaining steps come from the torch path.
"""
from __future__ import annotations

import io
import logging
import os
from typing import Callable, Optional

import numpy as np
import torch

from cimfast.pipelines.datasets import DemoDataset, FileListDataset, TwoViewDataset
from cimfast.pipelines.demo import demo_jpeg_files
from cimfast.pipelines.sampler import EpochSampler
from cimfast.pipelines.validate import DALI_FORMATS
from cimfast.pipelines.views import SCALE, sample_crop, sample_key, sample_mask

log = logging.getLogger("cimfast")


def dali_import_error() -> Optional[str]:
    """None when nvidia-dali imports, else why not."""
    try:
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA runtime inside the wheel
        return f"{type(e).__name__}: {e}"
    return None


def _header(data: bytes) -> tuple[int, int, str]:
    """(height, width, PIL format) from the header only (nothing decoded)."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            return h, w, im.format or ""
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def transcode(data: bytes) -> tuple[np.ndarray, int, int]:
    """Any image PIL reads -> binary PPM bytes (DALI reads PPM; lossless, no decoding cost)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, "PPM")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8), rgb.size[1], rgb.size[0]


class DaliSource:
    """The per-batch Python source: pipeline iteration ``i`` -> the batch of
    global micro-step ``start_step + i``. Stateless apart from caches of pure
    functions, so any worker process computes any batch."""

    def __init__(self, files: list, batch: int, rank: int, world: int, seed: int, start_step: int,
                 mask_fn: Optional[Callable] = None, info: Optional[list] = None, bad=(), recode=(), scale=SCALE):
        self.files, self.info = list(files), info
        self.sampler = EpochSampler(len(files), batch, rank, world, seed=seed, start_step=start_step)
        self.seed, self.start_step, self.mask_fn, self.scale = seed, start_step, mask_fn, scale
        self.bad, self.recode = frozenset(bad), frozenset(recode)
        self._order = (None, None)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_order"] = (None, None)
        return d

    def step_indices(self, step: int) -> tuple[int, np.ndarray]:
        epoch = self.sampler.position(step)[0]
        if self._order[0] != epoch:
            self._order = (epoch, self.sampler.order(epoch))
        return self.sampler.step_indices(step, self._order[1])

    def substitute(self, index: int) -> int:
        """The file index that stands in for sample ``index`` (itself unless known bad)."""
        n = len(self.files)
        for k in range(n):
            j = (index + k) % n
            if j not in self.bad:
                return j
        raise RuntimeError("no decodable image left in the file list")

    def encoded(self, j: int) -> tuple[np.ndarray, int, int]:
        """(bytes for DALI, height, width) of file ``j``; raises if unusable."""
        data = np.fromfile(self.files[j], dtype=np.uint8)
        if data.size == 0:
            raise ValueError("empty file")
        info = self.info[j] if self.info is not None else None
        if info is None:
            h, w, fmt = _header(data.tobytes())
        else:
            h, w, fmt = info
        if j in self.recode or (fmt and fmt not in DALI_FORMATS):
            data, h, w = transcode(data.tobytes())
        return data, h, w

    def sample(self, epoch: int, index: int) -> tuple:
        """Everything the pipeline takes for one sample."""
        j = self.substitute(index)
        while True:
            try:
                data, h, w = self.encoded(j)
                break
            except Exception:  # unreadable, empty, not an image: the next file (same rule as the torch path)
                self.bad = self.bad | {j}
                j = self.substitute(index)
        top, left, ch, cw, flip = sample_crop(self.seed, epoch, index, h, w, self.scale)
        out = [data, np.array([top, left], np.int32), np.array([ch, cw], np.int32), np.array(int(flip), np.int32),
               np.array(sample_key(self.seed, epoch, index), np.int64)]
        mask = sample_mask(self.seed, epoch, index, self.mask_fn)
        if mask is not None:
            out.append(mask)
        return tuple(out)

    def files_of_step(self, step: int) -> list[int]:
        epoch, idx = self.step_indices(step)
        return [self.substitute(int(i)) for i in idx]

    def __call__(self, batch_info) -> tuple:
        it = batch_info if isinstance(batch_info, int) else batch_info.iteration
        epoch, idx = self.step_indices(self.start_step + it)
        samples = [self.sample(epoch, int(i)) for i in idx]
        return tuple(list(col) for col in zip(*samples))

    @property
    def num_outputs(self) -> int:
        return 5 + (self.mask_fn is not None)


def build_pipeline(source: DaliSource, batch: int, size: int, tok_size: Optional[int], device: str = "cpu",
                   device_id: Optional[int] = None, threads: int = 2, py_workers: int = 0, prefetch: int = 2):
    """The DALI pipeline (built) and its output names."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device == "gpu"
    if gpu and device_id is None:
        raise ValueError("DALI on the GPU needs a device_id")
    parallel = py_workers > 0
    dtypes = [types.UINT8, types.INT32, types.INT32, types.INT32, types.INT64, types.BOOL][:source.num_outputs]
    ndims = [1, 1, 1, 0, 0, 1][:source.num_outputs]

    @pipeline_def(enable_conditionals=False)
    def two_views():
        es_kw = dict(prefetch_queue_depth=max(2, py_workers)) if parallel else {}
        outs = fn.external_source(source=source, num_outputs=source.num_outputs, batch=True, batch_info=True,
                                  parallel=parallel, dtype=dtypes, ndim=ndims, **es_kw)
        data, anchor, shape, flip, key = outs[:5]
        img = fn.decoders.image_slice(data, anchor, shape, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                      axis_names="HW", normalized_anchor=False, normalized_shape=False,
                                      adjust_orientation=False)
        views = []
        for s in (size, tok_size) if tok_size else (size,):
            # uint8 resizing and uint8 out (as the torch path): 0.4 ms less CPU per image than
            # float, a quarter of the bytes; the model makes floats on the training device
            v = fn.resize(img, size=[s, s], interp_type=types.INTERP_LINEAR, antialias=True)
            views.append(fn.crop_mirror_normalize(v, mirror=flip, mean=0.0, std=1.0, dtype=types.UINT8,
                                                  output_layout="CHW"))
        extra = [key] + ([outs[5]] if len(outs) > 5 else [])
        if gpu:
            extra = [e.gpu() for e in extra]
        return (*views, *extra)

    kw = dict(py_num_workers=py_workers, py_start_method="spawn") if parallel else {}
    pipe = two_views(batch_size=batch, num_threads=max(1, threads), device_id=device_id if gpu else None,
                     seed=0, prefetch_queue_depth=max(1, prefetch), **kw)
    pipe.build()
    names = ["images"] + (["images_tok"] if tok_size else []) + ["sample_key"] + \
        (["mask"] if source.mask_fn is not None else [])
    return pipe, names


class _DecodeCheck:
    """Decodes single files with DALI, to find the one that broke a pipeline."""

    def __init__(self, device: str, device_id: Optional[int]):
        self.device, self.device_id, self.pipe = device, device_id, None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def
        def one():
            d = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(d, device="mixed" if self.device == "gpu" else "cpu", output_type=types.RGB,
                                     adjust_orientation=False)

        self.pipe = one(batch_size=1, num_threads=1, device_id=self.device_id if self.device == "gpu" else None,
                        prefetch_queue_depth=1)
        self.pipe.build()

    def __call__(self, data: np.ndarray) -> bool:
        if self.pipe is None:
            self._build()
        try:
            self.pipe.feed_input("data", [data])
            self.pipe.run()
            return True
        except Exception:
            self.pipe = None  # invalidated
            return False


def _pil_decodes(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()
        return True
    except Exception:
        return False


class DaliBatches:
    """Endless iterator of this rank's micro-batches (dicts of torch tensors,
    like the torch path's), from global micro-step ``start_step`` on.

    ``device``: "gpu" (decoding with nvJPEG, outputs on ``cuda:device_id``) or
    "cpu" (outputs on the CPU). ``py_workers`` > 0 runs the Python source
    (file reads, crop parameters, masks) in that many worker processes.
    ``fallback(step)``: an endless iterator from global micro-step ``step`` on,
    used only if DALI fails in a way that checking the files cannot fix."""

    MAX_RETRIES = 3

    def __init__(self, files: list, size: int, tok_size: Optional[int], batch: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, start_step: int = 0, mask_fn: Optional[Callable] = None, info: Optional[list] = None,
                 device: str = "cpu", device_id: Optional[int] = None, threads: int = 2, py_workers: int = 0,
                 prefetch: int = 2, fallback: Optional[Callable[[int], object]] = None, scale=SCALE):
        self.files, self.info = list(files), info
        self.size, self.tok_size, self.batch, self.rank, self.world = size, tok_size, batch, rank, world
        self.seed, self.mask_fn, self.device, self.device_id, self.scale = seed, mask_fn, device, device_id, scale
        self.threads, self.py_workers, self.prefetch, self.fallback = threads, py_workers, prefetch, fallback
        self.sampler = EpochSampler(len(self.files), batch, rank, world, seed=seed, start_step=start_step)
        self.step = start_step  # the global micro-step of the next batch
        self.bad, self.recode = set(), set()
        self._iter, self._pipe, self._fallback_iter, self._fails_at = None, None, None, {}
        self._start(start_step)

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self.sampler.position(self.step)[0]

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def _source(self, start: int) -> DaliSource:
        return DaliSource(self.files, self.batch, self.rank, self.world, self.seed, start, self.mask_fn, self.info,
                          bad=self.bad, recode=self.recode, scale=self.scale)

    def _start(self, start: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self._close()
        self._pipe, names = build_pipeline(self._source(start), self.batch, self.size, self.tok_size, self.device,
                                           self.device_id, self.threads, self.py_workers, self.prefetch)
        # prepare_first_batch=False: a failure of the first batch surfaces in __next__, where it is handled
        self._iter = DALIGenericIterator([self._pipe], names, size=-1, auto_reset=False, prepare_first_batch=False)

    def _close(self) -> None:
        self._iter = None
        if self._pipe is not None:
            try:
                self._pipe._shutdown()  # stops the Python workers at once, if any
            except Exception:
                pass
            self._pipe = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._fallback_iter is not None:
            out = next(self._fallback_iter)
            self.step += 1
            return out
        while True:
            try:
                out = next(self._iter)[0]
                break
            except StopIteration:
                raise RuntimeError("the DALI source ended; it is meant to be endless") from None
            except Exception as e:  # DALI reports a failed decode as RuntimeError and is then unusable
                self._recover(e)
                if self._fallback_iter is not None:
                    return next(self)
        self.step += 1
        return out

    def _recover(self, error: Exception) -> None:
        step = self.step
        n = self._fails_at[step] = self._fails_at.get(step, 0) + 1
        found = self._find_undecodable(range(step, step + self.prefetch + 2)) if n <= self.MAX_RETRIES else []
        if found:
            log.warning("DALI could not decode %s; %s. Validate the data with python -m cimfast.pipelines.validate.",
                        ", ".join(self.files[j] for j in found),
                        "transcoding the ones PIL reads, replacing the others by the next image")
            self._start(step)
            return
        if self.fallback is None:
            raise RuntimeError(f"DALI failed at micro-step {step} and no file of it is at fault: {error}") from error
        log.warning("DALI failed at micro-step %d (%s) and no file of it is at fault; the torch pipeline "
                    "takes over from there", step, str(error).splitlines()[0] if str(error) else type(error).__name__)
        self._close()
        self._fallback_iter = iter(self.fallback(step))

    def _find_undecodable(self, steps) -> list[int]:
        check = _DecodeCheck(self.device, self.device_id)
        src = self._source(0)
        found = []
        for s in steps:
            for j in src.files_of_step(s):
                if j in self.bad or j in self.recode:
                    continue
                try:
                    data, _, _ = src.encoded(j)
                except Exception:
                    self.bad.add(j)
                    found.append(j)
                    continue
                if check(data):
                    continue
                raw = np.fromfile(self.files[j], dtype=np.uint8).tobytes()
                (self.recode if _pil_decodes(raw) else self.bad).add(j)
                found.append(j)
                src = self._source(0)  # the bad set changed the substitutes
        return found

    def __del__(self):
        self._close()


def dali_threads(device: str, local_world: int = 1, requested: int = 0) -> int:
    """DALI's CPU thread count: ``requested`` if > 0, else the CPU cores of this
    rank's share of the machine (at most 16 on the CPU; 2 to 8 for the GPU,
    whose threads only do the host part of the decoding)."""
    if requested > 0:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    n = max(1, min(16, cores // max(1, local_world)))
    return min(8, max(2, n)) if device == "gpu" else n


def dataset_files(dataset, cache_dir: Optional[str]) -> tuple[Optional[list], Optional[list], str]:
    """(files, info, why not) for a DALI reader of ``dataset``."""
    if isinstance(dataset, FileListDataset):
        return dataset.files, dataset.info, ""
    if isinstance(dataset, DemoDataset):
        paths, info = demo_jpeg_files(dataset.split, cache_dir)
        if len(paths) != len(dataset.images):
            return None, None, "the demo photographs changed while writing them"
        n = len(paths)
        return [paths[i % n] for i in range(len(dataset))], [info[i % n] for i in range(len(dataset))], ""
    return None, None, f"{type(dataset).__name__} has no image files"


def dali_batches(name: str, dataset, rank: int, world: int, micro: int, start: int, device, *,
                 cache_dir: Optional[str], threads: int, py_workers: int, torch_batches: Callable):
    """(batches, description) of the ``dali-gpu`` or ``dali-cpu`` pipeline over
    ``dataset``'s files; raises RuntimeError naming why it cannot run here."""
    err = dali_import_error()
    if err:
        raise RuntimeError(f"nvidia-dali does not import ({err}); pip install nvidia-dali-cuda130 "
                           "(or -cuda120, matching your torch's CUDA)")
    if not isinstance(dataset, TwoViewDataset):
        raise RuntimeError(f"{type(dataset).__name__} is not a TwoViewDataset")
    gpu = name == "dali-gpu"
    if gpu and device.type != "cuda":
        raise RuntimeError("training does not run on a CUDA device")
    files, info, why = dataset_files(dataset, cache_dir)
    if files is None:
        raise RuntimeError(why)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads = dali_threads("gpu" if gpu else "cpu", local_world, threads)
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    it = DaliBatches(files, dataset.size, dataset.tok_size, micro, rank=rank, world=world, seed=dataset.seed,
                     start_step=start, scale=dataset.scale,
                     mask_fn=dataset.mask_fn, info=info, device="gpu" if gpu else "cpu", device_id=device_id,
                     threads=threads, py_workers=py_workers, fallback=torch_batches)
    import nvidia.dali as dali

    where = f"decoding on cuda:{device_id} (nvJPEG)" if gpu else "decoding on the CPU"
    desc = (f"{name}: DALI {dali.__version__}, {threads} thread(s), {py_workers or 'no'} source worker process(es), "
            f"{where}, {len(files)} files")
    return it, desc
