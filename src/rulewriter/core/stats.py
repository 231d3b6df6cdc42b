"""The second moment ``C = E[k kᵀ]`` of a layer's keys (thesis Section 2.1.5, eq. 2.19).

``C`` tells an edit which key directions the layer actually uses, so that the update ``Λ (C⁻¹k*)ᵀ``
changes the output of every other key as little as possible. It is a small statistic object::

    s = SecondMoment()
    s.add(keys)                 # rows are keys, any float dtype; summed in float64
    s.merge(other)              # partial results from other processes add up
    C = s.moment()              # (d, d) float64

and :func:`collect_second_moment` streams a dataset through the model up to the layer, with a tqdm progress
bar, and caches the result as safetensors under a key derived from everything that changes it::

    stats = collect_second_moment(clf, "_blocks.10._project_conv", "photos/", samples=2000, cache_dir="~/.cache/rw")
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..atomic import remove_stale_temps
from ..errors import StatsError
from .artefacts import atomic_save, read_safetensors, tensors_checksum
from .memory import LayerMemory
from .trace import StopForward, Trace

__all__ = ["SecondMoment", "collect_second_moment", "collect_second_moments", "merge_files", "stats_cache_key",
           "key_products", "read_statistics", "check_made_for", "statistics_dataset", "dataset_fingerprint",
           "default_precision", "PRECISIONS"]

FORMAT = "rulewriter.second_moment/1"
#: How key products are formed within a batch. Every mode accumulates across batches in float64.
#: Relative errors of C measured against fp64 on EfficientNet-Lite0 keys (``benchmarks/throughput.py``).
PRECISIONS = {
    "fp64": "keys cast to float64 before the product (exact to float64 rounding)",
    "fp32": "products in float32 (TF32 disabled), ~3e-7 relative error",
    "tf32x2": "split TF32: k = hi + lo, hiᵀhi + hiᵀlo + (hiᵀlo)ᵀ; two TF32 GEMMs, fp32-level error (~4e-7)",
    "tf32": "one TF32 GEMM (10-bit mantissa inputs, fp32 sums), ~1e-4 relative error",
    "bf16": "bf16 inputs, fp32 sums, ~1e-3 relative error",
}
#: The largest relative error of C a default may have.
DEFAULT_TOLERANCE = 1e-4


def default_precision(device: str | torch.device) -> str:
    """The fastest product mode whose relative error of ``C`` stays within :data:`DEFAULT_TOLERANCE`.

    On CUDA this is ``tf32x2``: plain ``tf32`` measured 1.4e-4 on a 1152-d layer (over the tolerance) and
    ``bf16`` 1.2e-3, while two TF32 GEMMs cost less than one fp32 or fp64 GEMM on tensor-core GPUs. On
    CPUs, which have no TF32, it is ``fp32`` (half the bytes of fp64 at an error of ~3e-7).
    """
    return "tf32x2" if torch.device(device).type == "cuda" else "fp32"


def default_workers(device: str | torch.device) -> int:
    """DataLoader workers: on CUDA enough to keep the GPU fed (up to 8, one core left for the main process);
    on a CPU none, since decoding in workers takes cores from the forward pass it should overlap with."""
    if torch.device(device).type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, _local_world()) - 1))


def _local_world() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _round_mantissa(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Round float32 values to ``bits`` explicit mantissa bits (round to nearest), as TF32/bf16 inputs are."""
    drop = 23 - bits
    i = t.float().contiguous().view(torch.int32)
    i = (i + (1 << (drop - 1))) & ~((1 << drop) - 1)
    return i.view(torch.float32)


#: Held while cuBLAS's TF32 setting is changed for one product, so two threads never restore each other's value.
_TF32_LOCK = threading.Lock()


@contextlib.contextmanager
def cuda_tf32(enabled: bool):
    """cuBLAS float32 products with (``True``) or without TF32 inside the block, the previous setting after.

    Uses ``torch.backends.cuda.matmul.fp32_precision`` where torch has it (2.9+): the legacy ``allow_tf32``
    flag raises once anything in the process has used the newer setting. The setting is process-wide in
    torch; a lock keeps concurrent callers of this function from interleaving, and the block is kept to one
    GEMM, so other threads' float32 products are affected for that long at most.

    Example::

        >>> with cuda_tf32(False):
        ...     pass
    """
    matmul = torch.backends.cuda.matmul
    with _TF32_LOCK:
        if hasattr(matmul, "fp32_precision"):
            prev = matmul.fp32_precision
            matmul.fp32_precision = "tf32" if enabled else "ieee"
            try:
                yield
            finally:
                matmul.fp32_precision = prev
        else:  # older torch: only the legacy flag exists
            prev = matmul.allow_tf32
            matmul.allow_tf32 = enabled
            try:
                yield
            finally:
                matmul.allow_tf32 = prev


def _gemm(a: torch.Tensor, b: torch.Tensor, tf32: bool) -> torch.Tensor:
    """``a @ b`` in float32 with or without TF32 inputs: cuBLAS's setting on CUDA (see :func:`cuda_tf32`), the
    same input rounding emulated elsewhere (CPUs have no TF32)."""
    if a.is_cuda:
        with cuda_tf32(tf32):
            return a @ b
    return _round_mantissa(a, 10) @ _round_mantissa(b, 10) if tf32 else a @ b


#: Whether ``torch.mm`` takes ``out_dtype`` (bf16 inputs, float32 sums on CUDA): newer torch only; without it
#: the bf16 rounding is emulated and the product formed in float32.
try:
    _MM_OUT_DTYPE = torch.mm(torch.ones(1, 1, dtype=torch.bfloat16), torch.ones(1, 1, dtype=torch.bfloat16),
                             out_dtype=torch.float32).dtype == torch.float32
except (TypeError, RuntimeError):
    _MM_OUT_DTYPE = False

#: From this key dimension on, ``kᵀk`` is formed one block row at a time, upper triangle only, and mirrored:
#: half the multiply-adds (measured at 4608-d on 2 CPU cores: 312 vs 658 ms in fp32, 492 vs 800 ms in fp64).
SYMMETRIC_MIN_DIM = 1024
_SYMMETRIC_BLOCKS = 8


def _block_products(k: torch.Tensor, precision: str):
    """A function ``(I, J) -> k[:, I]ᵀ k[:, J]`` (float64) with the products formed in ``precision``."""
    if precision == "fp64":
        k = k.double()
        return lambda I, J: k[:, I].T @ k[:, J]
    k = k.float()
    if precision == "fp32":
        return lambda I, J: _gemm(k[:, I].T, k[:, J], tf32=False).double()
    if precision == "tf32":
        return lambda I, J: _gemm(k[:, I].T, k[:, J], tf32=True).double()
    if precision == "tf32x2":
        # k = hi + lo with hi exactly representable in TF32, so hiᵀhi is exact in fp32 sums and the cross
        # terms carry the rounding; loᵀlo is below fp32 resolution.
        hi = _round_mantissa(k, 10)
        lo = k - hi

        def split(I, J):
            parts = ((hi, hi), (hi, lo), (lo, hi))
            return sum(_gemm(a[:, I].T, b[:, J], tf32=True).double() for a, b in parts)
        return split
    if precision == "bf16":
        if k.is_cuda and _MM_OUT_DTYPE:
            kb = k.bfloat16()
            return lambda I, J: torch.mm(kb[:, I].T, kb[:, J], out_dtype=torch.float32).double()
        kb = _round_mantissa(k, 7)
        return lambda I, J: (kb[:, I].T @ kb[:, J]).double()
    raise StatsError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")


def key_products(k: torch.Tensor, precision: str) -> torch.Tensor:
    """``kᵀk`` of a batch of keys ``(n, d)`` formed in ``precision`` (see :data:`PRECISIONS`), as float64.

    Large key dimensions compute only the upper block triangle and mirror it (the result is symmetric).

    Example:
        >>> k = torch.randn(50, 4)
        >>> bool(torch.allclose(key_products(k, "tf32x2"), k.double().T @ k.double(), rtol=1e-5, atol=1e-4))
        True
    """
    block = _block_products(k, precision)
    d = k.shape[1]
    if d < SYMMETRIC_MIN_DIM:
        return block(slice(None), slice(None))
    out = torch.empty(d, d, dtype=torch.float64, device=k.device)
    b = -(-d // _SYMMETRIC_BLOCKS)
    for i in range(0, d, b):
        rows = slice(i, i + b)
        out[rows, i:] = block(rows, slice(i, None))
        diag = out[rows, rows]
        out[rows, rows] = (diag + diag.T) / 2  # a GEMM's (i, j) and (j, i) may round differently
        out[i + b:, rows] = out[rows, i + b:].T
    return out


class SecondMoment:
    """Streaming sum of outer products of keys, kept in float64.

    Example:
        >>> s = SecondMoment()
        >>> s.add(torch.randn(100, 8))
        >>> s.moment().shape
        torch.Size([8, 8])
    """

    def __init__(self, precision: str = "fp64") -> None:
        if precision not in PRECISIONS:
            raise StatsError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        self.meta: dict = {}  # what these were computed from (model, layer, data, ...); saved and loaded with them
        #: The file these were read from (by :meth:`load`, or a cache hit of :func:`collect_second_moment`),
        #: ``None`` for statistics computed in this process. Not saved.
        self.source: Path | None = None

    @classmethod
    def zeros(cls, dim: int, precision: str = "fp64", device: str | torch.device = "cpu") -> "SecondMoment":
        """Empty statistics of a known dimension (a rank whose shard is empty still takes part in a sum)."""
        s = cls(precision)
        s.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        s.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        return s

    def all_reduce(self) -> "SecondMoment":
        """Sum the partial statistics of every rank of the process group, in float64, in place."""
        from .distributed import all_reduce_sum

        if self.sum is None:
            raise StatsError("all_reduce needs initialised statistics (use SecondMoment.zeros for an empty shard)")
        count = torch.tensor([self.count], dtype=torch.float64, device=self.sum.device)
        count, self.sum, self.outer = all_reduce_sum([count, self.sum, self.outer])
        self.count = int(round(float(count[0])))
        return self

    @property
    def dim(self) -> int | None:
        return None if self.sum is None else self.sum.shape[0]

    def add(self, keys: torch.Tensor) -> None:
        """Add a batch of keys, one per row ``(n, d)``."""
        if keys.dim() != 2:
            raise StatsError(f"keys must be (n, d) rows, got shape {tuple(keys.shape)}")
        if not torch.isfinite(keys).all():
            raise StatsError("keys contain NaN or inf; check the model and its inputs")
        if self.sum is None:
            d = keys.shape[1]
            self.sum = torch.zeros(d, dtype=torch.float64, device=keys.device)
            self.outer = torch.zeros(d, d, dtype=torch.float64, device=keys.device)
        elif keys.shape[1] != self.dim:
            raise StatsError(f"keys have dimension {keys.shape[1]}, these statistics have {self.dim}")
        k = keys.to(self.outer.device)
        if self.precision == "fp64" and k.shape[1] < SYMMETRIC_MIN_DIM:
            k = k.double()
            self.outer.addmm_(k.T, k)  # in place: no d×d temporary
        else:
            self.outer += key_products(k, self.precision)
        self.sum += k.double().sum(0)
        self.count += keys.shape[0]

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        """Add another partial result into this one (in place) and return self."""
        if other.sum is None:
            return self
        if self.sum is None:
            self.sum, self.outer = other.sum.clone(), other.outer.clone()
        elif other.dim != self.dim:
            raise StatsError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        else:
            self.sum += other.sum.to(self.sum.device)
            self.outer += other.outer.to(self.outer.device)
        self.count += other.count
        return self

    def moment(self) -> torch.Tensor:
        """``C = E[k kᵀ]`` (float64)."""
        if not self.count:
            raise StatsError("no keys were added; the statistics are empty")
        c = self.outer / self.count
        if not torch.isfinite(c).all():
            raise StatsError("the second moment contains NaN or inf")
        return c

    def mean(self) -> torch.Tensor:
        """``E[k]`` (float64)."""
        if not self.count:
            raise StatsError("no keys were added; the statistics are empty")
        return self.sum / self.count

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.sum is None:
            raise StatsError("no keys were added; nothing to save")
        return {"count": torch.tensor([self.count], dtype=torch.int64), "sum": self.sum.cpu(),
                "outer": self.outer.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            count, s, o = state["count"], state["sum"], state["outer"]
        except KeyError as e:
            raise StatsError(f"statistics file lacks tensor {e}") from None
        if count.numel() != 1 or count.is_floating_point() or int(count.reshape(-1)[0]) < 1:
            raise StatsError(f"statistics file holds no keys (count {count.tolist()})")
        if s.dim() != 1 or o.shape != (s.shape[0], s.shape[0]) or not torch.isfinite(o).all():
            raise StatsError("statistics file is inconsistent or contains NaN")
        self.count, self.sum, self.outer = int(count.reshape(-1)[0]), s.double(), o.double()

    def check_model(self, classifier, source: str | Path | None = None) -> None:
        """Refuse (StatsError) statistics made for another model or other weights: :func:`check_made_for`."""
        check_made_for(self.meta, classifier, source)

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        """Write atomically as safetensors; ``metadata`` (JSON-able, default :attr:`meta`) goes in the header."""
        state = self.state_dict()
        meta = {"format": FORMAT, "precision": self.precision,
                "meta": json.dumps(self.meta if metadata is None else metadata, sort_keys=True),
                "sha256": tensors_checksum(state)}
        return atomic_save(state, Path(path), meta)

    @classmethod
    def load(cls, path: str | Path) -> "SecondMoment":
        """Read statistics saved by :meth:`save`; their metadata is on :attr:`meta`.

        Example::

            >>> s = SecondMoment.load("C.safetensors")        # doctest: +SKIP
            >>> s.dim, s.count, s.meta["layer"]               # doctest: +SKIP
            (320, 1254400, '_blocks.15._project_conv')
        """
        tensors, header, meta = read_statistics(path, FORMAT, "a rulewriter statistics file")
        try:
            s = cls(header.get("precision", "fp64"))
        except StatsError as e:
            raise StatsError(f"{path}: {e}") from None
        try:
            s.load_state_dict(tensors)
        except StatsError as e:
            raise StatsError(f"{path}: {e}") from None
        s.meta = meta
        s.source = Path(path)
        return s


def check_made_for(meta: dict, classifier, source: str | Path | None = None) -> None:
    """Refuse (StatsError) statistics whose ``meta`` names another model or other weights than ``classifier``'s
    ``name`` and ``weights_id``; statistics that do not say what they were made from pass.

    Example:
        >>> check_made_for({"model": "vgg16"}, type("C", (), {"name": "vgg16", "weights_id": "ab"})())
    """
    model, weights = meta.get("model"), meta.get("weights")
    if model not in (None, classifier.name) or weights not in (None, classifier.weights_id):
        raise StatsError(
            f"{source or 'these statistics'} holds statistics of model {model} with weights {weights}, but "
            f"the model loaded is {classifier.name} with weights {classifier.weights_id}; collect "
            "statistics for this model (or pass --force)"
        )


def read_statistics(path: str | Path, fmt: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """Read a statistics file (second moment, key spectrum): its tensors, header and metadata, checked.

    The header's ``format`` must be ``fmt``; the tensors must match the header's checksum
    (:func:`tensors_checksum`; files written before checksums existed have none); ``meta`` must be a JSON
    object. Anything else is a :class:`~rulewriter.errors.StatsError` naming the file.
    """
    tensors, header = read_safetensors(Path(path), StatsError)
    if header.get("format") != fmt:
        raise StatsError(f"{path} is not {what} (format {header.get('format')!r})")
    if "sha256" in header and header["sha256"] != tensors_checksum(tensors):
        raise StatsError(f"{path} is corrupt: its tensors do not match the checksum in its header")
    try:
        meta = json.loads(header.get("meta", "{}"))
    except ValueError as e:
        raise StatsError(f"{path}: its metadata is not valid JSON ({e})") from None
    except RecursionError:
        raise StatsError(f"{path}: its metadata is nested too deeply") from None
    if not isinstance(meta, dict):
        raise StatsError(f"{path}: its metadata must be a JSON object, got {type(meta).__name__}")
    return tensors, header, meta


def stats_cache_key(parts: dict) -> str:
    """A hex digest over every setting that changes the statistics."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def statistics_dataset(classifier, data, samples: int | None, seed: int):
    """The images statistics are collected from, as a dataset of preprocessed tensors.

    ``data`` is a folder, a list of image paths, or a torch Dataset; ``samples`` draws a deterministic
    subsample (``seed``), the same one for every statistic of the same data (so caches agree).

    Example::

        >>> len(statistics_dataset(clf, "photos/", 100, 0))        # doctest: +SKIP
        100
    """
    from ..models.data import ImageDataset, list_images, subsample

    if isinstance(data, torch.utils.data.Dataset):
        if samples is not None and samples < len(data):
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(len(data), generator=g)[:samples].tolist()
            data = torch.utils.data.Subset(data, sorted(idx))
        return data
    paths = list_images(data) if isinstance(data, (str, Path)) else [Path(p) for p in data]
    if samples is not None:
        paths = subsample(paths, samples, seed=seed)
    return ImageDataset(paths, classifier.preprocess)


def dataset_fingerprint(ds) -> str | None:
    """A string that changes when a statistics dataset's images (or the subsample of them) change: a cache key
    part; ``None`` when the dataset cannot say (then nothing about it may be cached).

    Folders and path lists fingerprint their paths, sizes and times (``ImageDataset.fingerprint``); a
    ``TensorDataset`` hashes its tensors' contents; a ``Subset`` adds its indices to its dataset's
    fingerprint; any other Dataset can define ``fingerprint()``. A type and a length are not enough: two
    different datasets of one length would share a cache entry.

    Example::

        >>> dataset_fingerprint(torch.utils.data.TensorDataset(torch.zeros(2, 3)))[:7]
        'tensors'
    """
    fp = getattr(ds, "fingerprint", None)
    if callable(fp):
        return fp()
    if isinstance(ds, torch.utils.data.TensorDataset):
        h = hashlib.sha256()
        for t in ds.tensors:
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return f"tensors:{h.hexdigest()}"
    if isinstance(ds, torch.utils.data.Subset):
        inner = dataset_fingerprint(ds.dataset)
        return None if inner is None else f"{inner}:{stats_cache_key({'idx': list(ds.indices)})[:16]}"
    return None


def _resolve_device(device: str | torch.device | None, classifier) -> torch.device:
    if device is None:
        return classifier.device
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _partial_path(cache: Path, rank: int, world: int) -> Path:
    return cache.with_name(f"{cache.stem}.partial-{rank}of{world}.safetensors")


def collect_second_moment(
    classifier,
    layer: str,
    data: str | Path | Sequence[str | Path] | torch.utils.data.Dataset,
    *,
    view: int = 2,
    samples: int | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    precision: str = "auto",
    amp: str | None = None,
    channels_last: bool | None = None,
    cache_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    shard: str | tuple[int, int] | None = None,
    num_workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SecondMoment:
    """Stream images through ``classifier`` up to ``layer`` and collect the second moment of its keys.

    Under ``torchrun`` (an initialised process group) every rank reads its own shard of the images
    (``rank::world_size``), the partial sums are added with ``all_reduce`` in float64, every rank returns the
    same result, and only rank 0 writes the cache.

    Args:
        classifier: a :class:`~rulewriter.models.registry.Classifier`.
        layer: dotted layer name.
        data: an image folder (ImageNet-style class folders are searched recursively), a list of image
            paths, or a Dataset yielding ``(image_tensor, label)``.
        view: memory view (1–4) whose keys to collect.
        samples: use this many images (a deterministic random subset), or all when ``None``.
        batch_size, num_workers: DataLoader knobs (``num_workers=None``: :func:`default_workers`); memory
            pinned on CUDA. Lower ``batch_size`` when memory
            is short: only one batch of keys is ever held.
        device: ``None`` keeps the model where it is, ``"auto"`` picks CUDA when available.
        precision: how products are formed (see :data:`PRECISIONS`); ``"auto"`` is
            :func:`default_precision` for the device. Sums across batches are always float64.
        amp: ``"bf16"`` runs the forward pass under bf16 autocast (faster on GPUs; keys then differ from the
            float32 model's by ~4e-3 relative, see the README); ``None`` keeps the model's own dtype.
        channels_last: NHWC memory format for the forward pass (default: on CUDA only).
        cache_dir: when given, load the result from / save it to a safetensors file there, named by a key
            over the model, its weights, the layer, the view, the data, the sample count, preprocessing and
            precision. A partial result is saved there every ``checkpoint_every`` batches and an interrupted
            run resumes from it.
        shard: ``"i/N"`` or ``(i, N)``: only the i-th of N strided shards of the images, for machines that
            share no process group; save each part and add them with :func:`merge_files`
            (``rulewriter merge-stats``), which refuses a shard twice and reports missing ones.
        progress: show a tqdm progress bar (rank 0 only).

    Example:
        >>> clf = load_classifier("efficientnet-lite0")                                 # doctest: +SKIP
        >>> s = collect_second_moment(clf, "_blocks.10._project_conv", "photos/", samples=1000)  # doctest: +SKIP
    """
    return collect_second_moments(
        classifier, [layer], data, view=view, samples=samples, batch_size=batch_size, device=device,
        precision=precision, amp=amp, channels_last=channels_last, cache_dir=cache_dir,
        checkpoint_every=checkpoint_every, shard=shard, num_workers=num_workers, seed=seed, progress=progress,
    )[layer]


def collect_second_moments(
    classifier,
    layers: Sequence[str],
    data: str | Path | Sequence[str | Path] | torch.utils.data.Dataset,
    *,
    view: int = 2,
    samples: int | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    precision: str = "auto",
    amp: str | None = None,
    channels_last: bool | None = None,
    cache_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    shard: str | tuple[int, int] | None = None,
    num_workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, SecondMoment]:
    """:func:`collect_second_moment` at each of ``layers`` from one pass over the images: the same
    statistics, cache files and keys as one call per layer (a layer already cached is read, not collected),
    at the cost of one forward pass up to the deepest layer still to collect instead of one per layer (the
    layer choice needs C at every candidate layer).

    Example:
        >>> cs = collect_second_moments(clf, clf.candidate_layers, "photos/", samples=1000)  # doctest: +SKIP
        >>> cs["_conv_head"].count                                                          # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from . import distributed as D

    layers = list(dict.fromkeys(layers))
    if not layers:
        raise StatsError("no layer to collect statistics at")
    dev = D.local_device(_resolve_device(device, classifier))
    if precision == "auto":
        precision = default_precision(dev)
    if precision not in PRECISIONS:
        raise StatsError(f"precision must be one of {sorted(PRECISIONS)} or 'auto', got {precision!r}")
    if amp not in (None, "bf16"):
        raise StatsError(f"amp must be None or 'bf16', got {amp!r}")
    if batch_size < 1:
        raise StatsError(f"batch size must be at least 1, got {batch_size}")
    if channels_last is None:
        channels_last = dev.type == "cuda"
    model = classifier.model
    mems = {layer: LayerMemory(_module(model, layer), view, name=layer) for layer in layers}
    ds = statistics_dataset(classifier, data, samples, seed)
    if len(ds) == 0:
        raise StatsError("no images to collect statistics from")
    part = _parse_shard(shard)
    fingerprint = dataset_fingerprint(ds)
    if fingerprint is None and cache_dir is not None:
        warnings.warn(f"{type(ds).__name__} has no fingerprint() and is not a TensorDataset, so its statistics are "
                      "not cached (define fingerprint() to cache them)", stacklevel=2)
        cache_dir = None
    n_images = len(ds)
    if part is not None:
        ds = torch.utils.data.Subset(ds, D.shard_indices(len(ds), rank_=part[0], world=part[1]))
    rank, world = D.rank(), D.world_size()
    metas, keys, caches, partials, out = {}, {}, {}, {}, {}
    for layer in layers:
        meta = {
            "model": classifier.name,
            "weights": classifier.weights_id,
            "layer": layer,
            "view": view,
            "key_dim": mems[layer].key_dim,
            "data": fingerprint,
            "n_images": n_images,
            "seed": seed,
            "preprocess": classifier.preprocess.describe(),
            "precision": precision,
        }
        if amp:
            meta["amp"] = amp  # only when set, so float32 runs keep their earlier cache keys
        if part is not None:
            meta["shard"] = f"{part[0]}/{part[1]}"
        metas[layer], keys[layer] = meta, stats_cache_key(meta)
        caches[layer] = partials[layer] = None
        if cache_dir is not None:
            safe_layer = layer.replace("/", "_")
            cache = Path(cache_dir).expanduser() / (f"stats-{classifier.name}-{safe_layer}-v{view}-"
                                                    f"{keys[layer][:16]}.safetensors")
            if rank == 0:
                remove_stale_temps(cache.parent)  # temp files of writers killed mid-write
            hit = None
            if cache.is_file():
                try:
                    stats = SecondMoment.load(cache)
                except StatsError as e:  # truncated or flipped bits: a cache entry is only ever a head start
                    warnings.warn(f"the statistics cache entry is damaged and is rebuilt: {e}", stacklevel=2)
                    stats = None
                if stats is not None and stats.meta.get("key") == keys[layer]:
                    hit = stats
            # Under torchrun all ranks use the cache or none does (a file some ranks cannot see must not leave
            # the others waiting in all_reduce).
            if D.all_ranks(hit is not None):
                out[layer] = hit
                continue
            caches[layer], partials[layer] = cache, _partial_path(cache, rank, world)
    todo_layers = [layer for layer in layers if layer not in out]
    if not todo_layers:
        return {layer: out[layer] for layer in layers}

    mine = D.shard_indices(len(ds), rank_=rank, world=world)
    stats_of = {layer: SecondMoment.zeros(mems[layer].key_dim, precision, dev) for layer in todo_layers}
    resumed = {}
    for layer in todo_layers:
        partial = partials[layer]
        if partial is not None and partial.is_file():
            try:
                saved_stats = SecondMoment.load(partial)
                saved = saved_stats.meta
            except StatsError:
                saved_stats, saved = None, {}  # a damaged partial file is only a lost head start
            if saved_stats is not None and saved.get("key") == keys[layer] and saved_stats.dim == mems[layer].key_dim:
                resumed[layer] = (saved_stats, int(saved.get("images_done", 0)))
    # A run resumes only where every layer still to collect saved the same number of images.
    dones = {d for _, d in resumed.values()}
    done = dones.pop() if len(resumed) == len(todo_layers) and len(dones) == 1 else 0
    if done:
        for layer in todo_layers:
            stats_of[layer].merge(resumed[layer][0])
    todo = mine[done:]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, todo), batch_size=batch_size, shuffle=False,
        num_workers=default_workers(dev) if num_workers is None else num_workers,
        pin_memory=dev.type == "cuda", persistent_workers=False,
    )
    was_training = model.training
    # Put the model back as it came: its device and, for conv weights, its memory format.
    home = next((p.device for p in model.parameters()), dev)
    was_nhwc = next((p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                     for p in model.parameters() if p.dim() == 4), False)
    model.eval().to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext())
    what = todo_layers[0] if len(todo_layers) == 1 else f"{len(todo_layers)} layers"
    bar = tqdm(total=len(mine), initial=done, desc=f"stats {what}", disable=not progress or rank != 0,
               unit="img")
    # The forward stops after the layer that runs last (module order; checked on every batch, and run to
    # the end instead wherever a traced layer did not run before it).
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    last = max(todo_layers, key=lambda layer: position.get(layer, -1))
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            trs = {layer: stack.enter_context(Trace(model, layer, retain_output=not mems[layer].forward_direction,
                                                    stop=layer == last)) for layer in todo_layers}
            for i, batch in enumerate(loader, 1):
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                x = x.to(dev, classifier.dtype, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                while True:
                    for tr in trs.values():
                        tr.reset()
                    with autocast:
                        try:
                            model(x)
                        except StopForward:
                            pass
                    if all(tr.input is not None for tr in trs.values()) or not trs[last].stop:
                        break
                    trs[last].stop = False  # a traced layer runs after the one thought last: run to the end
                for layer, tr in trs.items():
                    k_in, k_out = tr.input, tr.output
                    if k_in is None:
                        raise StatsError(f"layer {layer!r} did not run in the forward pass")
                    if amp:  # bf16 activations; products are formed in the chosen precision from float32 keys
                        k_in, k_out = k_in.float(), None if k_out is None else k_out.float()
                    stats_of[layer].add(mems[layer].flat_keys(k_in, k_out))
                done += x.shape[0]
                bar.update(x.shape[0])
                if checkpoint_every and i % checkpoint_every == 0 and done < len(mine):
                    for layer in todo_layers:
                        if partials[layer] is not None:
                            stats_of[layer].save(partials[layer], {**metas[layer], "key": keys[layer],
                                                                   "images_done": done, "rank": rank, "world": world})
    finally:
        bar.close()
        if channels_last != was_nhwc:
            model.to(memory_format=torch.channels_last if was_nhwc else torch.contiguous_format)
        model.to(home)
        model.train(was_training)
    for layer in todo_layers:
        stats = stats_of[layer]
        stats.all_reduce()
        if stats.count == 0:
            raise StatsError("no keys were collected")
        stats.meta = {**metas[layer], "key": keys[layer], "count": stats.count}
        if caches[layer] is not None:
            if rank == 0:
                stats.save(caches[layer], stats.meta)
            D.barrier()  # nobody removes its partial file before the merged result is safely on disk
            if partials[layer] is not None:
                partials[layer].unlink(missing_ok=True)
        out[layer] = stats
    return {layer: out[layer] for layer in layers}


def _parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    try:
        i, n = (int(v) for v in (shard.split("/") if isinstance(shard, str) else shard))
    except (ValueError, TypeError):
        raise StatsError(f"shard must look like 'i/N', e.g. '0/4'; got {shard!r}") from None
    if not 0 <= i < n:
        raise StatsError(f"shard {i}/{n}: need 0 <= i < N")
    return i, n


def _module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    from .trace import get_module

    return get_module(model, layer)


def merge_files(paths: Iterable[str | Path]) -> tuple[SecondMoment, dict]:
    """Merge statistics saved by several processes or machines; their settings must agree.

    Every file must be of the same model, weights, layer, view, preprocessing, product precision and amp
    setting. The same images may enter the sum only once: a shard given twice, two whole-data files of the
    same images, or a whole-data file together with one of its own shards are refused. Whole-data files
    of *different* images add up (their fingerprints are listed under ``data``).

    Returns the merged statistics and the first file's metadata with the merged count.
    """
    merged: SecondMoment | None = None
    first: dict = {}
    shards: dict[tuple[str, str], set[int]] = {}  # (data fingerprint, N) -> shard indices seen
    whole: list[str] = []  # data fingerprints of files that hold all of their images
    for p in paths:
        s = SecondMoment.load(p)
        meta = s.meta
        check = {k: meta.get(k) for k in ("model", "weights", "layer", "view", "key_dim", "preprocess",
                                          "precision", "amp")}
        data = str(meta.get("data"))  # files that do not say what they hold are not checked for overlap
        if "shard" in meta:
            i, n = _parse_shard(meta["shard"])
            seen = shards.setdefault((data, str(n)), set())
            if i in seen:
                raise StatsError(f"cannot merge {p}: shard {i}/{n} of these images is already in the sum")
            seen.add(i)
        elif meta.get("data") is None:
            pass
        elif data in whole:
            raise StatsError(f"cannot merge {p}: statistics of the same images are already in the sum")
        else:
            whole.append(data)
        if data in whole and any(d == data for d, _ in shards):
            raise StatsError(f"cannot merge {p}: it and another file hold the same images, whole and as a shard "
                             "(they would be counted twice)")
        if merged is None:
            merged, first, ref = s, meta, check
        else:
            if check != ref:
                diff = {k: (ref[k], check[k]) for k in ref if ref[k] != check[k]}
                raise StatsError(f"cannot merge {p}: its settings differ: {diff}")
            merged.merge(s)
    if merged is None:
        raise StatsError("no statistics files to merge")
    out = {k: v for k, v in first.items() if k not in ("shard", "key")}
    out.update(count=merged.count, merged=True)
    if len(whole) > 1:
        out["data"] = whole
    if shards:
        out["shards"] = {f"{data[:16]}…/{n}": sorted(seen) for (data, n), seen in shards.items()}
        out["missing_shards"] = sorted(f"{i}/{n}" for (_, n), seen in shards.items()
                                       for i in range(int(n)) if i not in seen)
    return merged, out
