"""The inverse-direction edit as a convolution, solved in the Fourier domain (thesis Section 3.3).

The inverse memory of a convolutional layer is the adjoint (transposed) convolution ``x ≈ M ⊛ y``.
Eqs. 3.43–3.57 minimise the change of its output over every output map, ``E‖ΔM ⊛ y‖²``, with the key
autocorrelation ``R_y`` computed in the Fourier domain (:class:`KeySpectrum`, :func:`collect_key_spectrum`),
subject to ``(M0 + ΔM) ⊛ k* = v*`` for the spatially constant map ``k*`` (eq. 3.46).
:func:`conv_lstsq_fourier` is the per-frequency least squares of eqs. 3.37–3.57 (and its exact form on a
kernel's own taps); :func:`fourier_layer_update` the layer's weight change that
:func:`rulewriter.extensions.inverse.inverse_rewrite` uses for ``solver="fourier"``.

Example::

    spectrum = collect_key_spectrum(clf, layer, "photos/", samples=1000)
    edit = inverse_rewrite(clf, rule, spectrum, solver="fourier")
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..core.edit import DEFAULT_RIDGE, solve_lambda, update_direction
from ..errors import EditError, StatsError
from ..core.memory import LayerMemory
from ..core.artefacts import atomic_save, tensors_checksum
from ..core.stats import check_made_for, dataset_fingerprint, read_statistics, stats_cache_key, statistics_dataset
from ..core.trace import Trace, get_module

__all__ = [
    "SPECTRUM_FORMAT",
    "KeySpectrum",
    "collect_key_spectrum",
    "correlate",
    "conv_lstsq_fourier",
    "fourier_layer_update",
]

SPECTRUM_FORMAT = "rulewriter.key_spectrum/1"


def correlate(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Circular cross-correlation ``R[p, q](Δ) = Σ_n Σ_x a_p(x) b_q(x + Δ)`` via the FFT (float64).

    ``a`` (N, p, H, W), ``b`` (N, q, H, W) (default ``a``: the autocorrelation ``R_A`` of eq. 3.36). The
    DFT of ``R`` over ``Δ`` is ``Σ_n conj(â_p) b̂_q``, the spectra of eq. 3.39. Returns (p, q, H, W).

    Example:
        >>> a = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        >>> r = correlate(a)
        >>> bool(torch.allclose(r[:, :, 0, 0], torch.einsum("nphw,nqhw->pq", a, a)))
        True
    """
    b = a if b is None else b
    if a.dim() != 4 or b.dim() != 4 or a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise EditError(f"correlate needs (N, p, H, W) and (N, q, H, W) maps, got {tuple(a.shape)}, {tuple(b.shape)}")
    fa, fb = torch.fft.fft2(a.double()), torch.fft.fft2(b.double())
    return torch.fft.ifft2(torch.einsum("nphw,nqhw->pqhw", fa.conj(), fb)).real


def _toeplitz(r: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``C[(p', t'), (p, t)] = R[p', p](δ_t − δ_t')``: the Gram matrix of shifted maps (Toeplitz blocks)."""
    p, _, h, w = r.shape
    dh = (offsets[None, :, 0] - offsets[:, None, 0]) % h  # (t', t)
    dw = (offsets[None, :, 1] - offsets[:, None, 1]) % w
    blocks = r[:, :, dh, dw]  # (p', p, t', t)
    t = offsets.shape[0]
    return blocks.permute(0, 2, 1, 3).reshape(p * t, p * t)


def _as_cols(t: torch.Tensor | None, n: int, what: str) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.double()
    t = t[:, None] if t.dim() == 1 else t
    if t.dim() != 2 or t.shape[0] != n:
        raise EditError(f"{what} must have {n} rows, got shape {tuple(t.shape)}")
    return t


def conv_lstsq_fourier(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    offsets: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    ridge: float = 0.0,
) -> torch.Tensor:
    """Least-squares circular convolution ``V ≈ K ⋆ A`` in the Fourier domain (Section 3.3, eqs. 3.37–3.57).

    The model is the multichannel circular cross-correlation ``V_o(x) = Σ_p Σ_t K[o, p, t] A_p(x + δ_t)``
    over maps ``inputs`` A (N, p, H, W) and ``targets`` V (N, o, H, W), float64.

    * ``offsets=None`` (the thesis's formula): the filter spans the whole H×W grid. Parseval makes the
      problem separable per frequency ω: ``conj(K̂(ω)) = S_VA(ω) S_AA(ω)⁻¹`` with the cross-spectra
      ``S_VA = Σ V̂ Âᴴ = F(V ⋆ A)`` and ``S_AA = Σ Â Âᴴ = F(R_A)`` (eqs. 3.39–3.42, the inverse being a
      p×p solve per frequency). Returns K as (o, p, H, W), indexed by the offset δ.
    * ``offsets=[(dh, dw), ...]``: the filter is confined to those taps (a real layer's m×n kernel). The
      support couples the frequencies, so eq. 3.37 is solved on the support itself: the normal equations
      ``K C = Y`` with Toeplitz blocks ``C[(p',t'),(p,t)] = R_A[p',p](δ_t − δ_t')`` and
      ``Y[o,(p,t)] = R_VA[o,p](δ_t)``, both correlations taken by FFT (:func:`correlate`).
      Returns K as (o, p, T).

    ``key`` (p,) or (p, r) and ``value`` (o,) or (o, r) add the constraint of eqs. 3.44–3.46: the filter's
    response to the spatially constant map ``k*`` is ``v*``, ``Σ_{p,t} K[o,p,t] k*_p = v*_o``. Its Lagrange
    term is constant over the taps (eq. 3.50), so with full support it lives at ω = 0 only (eq. 3.55): the
    constrained filter differs from the unconstrained one by a constant over the whole grid. On a tap
    support it is the forward rank-r update ``Λ (C⁻¹κ)ᵀ`` with ``κ = k*`` repeated over the taps.
    ``ridge`` adds ``ε = ridge·tr/d`` to each normal matrix (0: exact, singular spectra raise StatsError).

    Example:
        >>> a = torch.randn(16, 2, 4, 4, dtype=torch.float64)
        >>> k = torch.randn(3, 2, 2, dtype=torch.float64)        # two taps: δ = (0, 0) and (0, 1)
        >>> v = torch.einsum("opt,tnphw->nohw", k, torch.stack([a, torch.roll(a, -1, 3)]))
        >>> torch.allclose(conv_lstsq_fourier(a, v, offsets=[(0, 0), (0, 1)]), k)
        True
    """
    a, v = inputs.double(), targets.double()
    if a.dim() != 4 or v.dim() != 4 or a.shape[0] != v.shape[0] or a.shape[2:] != v.shape[2:]:
        raise EditError(f"inputs and targets must be (N, p, H, W) and (N, o, H, W) on one grid, got "
                        f"{tuple(a.shape)} and {tuple(v.shape)}")
    n, p, h, w = a.shape
    o = v.shape[1]
    key, value = _as_cols(key, p, "key"), _as_cols(value, o, "value")
    if (key is None) != (value is None) or (key is not None and key.shape[1] != value.shape[1]):
        raise EditError("give key and value together, with one column per constraint")
    if offsets is None:
        fa, fv = torch.fft.fft2(a), torch.fft.fft2(v)
        s_aa = torch.einsum("nphw,nqhw->hwpq", fa, fa.conj())
        s_va = torch.einsum("nohw,nqhw->hwoq", fv, fa.conj())
        if ridge:
            eps = ridge * torch.diagonal(s_aa, dim1=-2, dim2=-1).real.mean(-1)
            s_aa = s_aa + eps[..., None, None] * torch.eye(p, dtype=s_aa.dtype)
        try:
            g = torch.linalg.solve(s_aa, s_va, left=False)  # G S_AA = S_VA, one p×p system per frequency
        except RuntimeError as e:
            raise StatsError(f"a cross-spectrum S_AA(ω) is singular ({e}); use more maps or ridge > 0") from None
        if key is not None:
            # Only the DC term carries the constraint (eq. 3.55): the forward closed form at ω = 0.
            g0 = g[0, 0].real
            d = update_direction(s_aa[0, 0].real, key, 0.0)
            g[0, 0] = (g0 + solve_lambda(g0, key, value, d) @ d.T).to(g.dtype)
        return torch.fft.ifft2(g.conj().permute(2, 3, 0, 1)).real  # eqs. 3.41–3.42
    off = torch.as_tensor(offsets, dtype=torch.long).reshape(-1, 2)
    c = _toeplitz(correlate(a), off)
    y = correlate(v, a)[:, :, off[:, 0] % h, off[:, 1] % w].reshape(o, p * off.shape[0])
    k = update_direction(c, y.T, ridge).T  # K = Y C⁻¹ by Cholesky
    if key is not None:
        kappa = key.repeat_interleave(off.shape[0], dim=0)  # k* at every tap, (p, t) order
        d = update_direction(c, kappa, ridge)
        k = k + solve_lambda(k, kappa, value, d) @ d.T
    return k.reshape(o, p, off.shape[0])


class KeySpectrum:
    """Cross-spectra ``Σ conj(ŷ_f(ω)) ŷ_g(ω)`` of a layer's output maps: ``F(R_y)`` of eq. 3.39, mergeable.

    The Fourier solver's statistic: :meth:`autocorrelation` gives ``R_y[f, g](Δ) = E Σ_x y_f(x) y_g(x+Δ)``
    (circular) for every offset of the output grid. Sums are complex128; the maps must share one grid.

    Example:
        >>> s = KeySpectrum(); s.add(torch.randn(4, 3, 5, 6))
        >>> s.autocorrelation().shape
        torch.Size([3, 3, 5, 6])
    """

    def __init__(self) -> None:
        self.spec: torch.Tensor | None = None  # (f, f, H, W//2+1) complex128
        self.grid: tuple[int, int] | None = None
        self.count = 0
        self.meta: dict = {}  # what the spectrum was computed from; saved and loaded with it
        self.source: Path | None = None  # the file it was read from (a cache hit), not saved

    @property
    def dim(self) -> int:
        return 0 if self.spec is None else int(self.spec.shape[0])

    def add(self, maps: torch.Tensor) -> None:
        """Add output maps (B, f, H, W) (bias removed)."""
        if maps.dim() != 4:
            raise StatsError(f"a key spectrum takes (B, f, H, W) maps, got {tuple(maps.shape)}")
        grid = tuple(maps.shape[2:])
        if self.grid is not None and (grid != self.grid or maps.shape[1] != self.dim):
            raise StatsError(f"maps {tuple(maps.shape[1:])} do not match the spectrum's {self.dim}×{self.grid}")
        y = torch.fft.rfft2(maps.detach().double())
        part = torch.einsum("bfhw,bghw->fghw", y.conj(), y)
        self.spec = part if self.spec is None else self.spec + part.to(self.spec.device)
        self.grid = grid
        self.count += int(maps.shape[0])

    def merge(self, other: "KeySpectrum") -> "KeySpectrum":
        """Add another spectrum of the same layer (in place) and return self."""
        if other.spec is None:
            return self
        if self.spec is None:
            self.spec, self.grid = other.spec.clone(), other.grid
        elif other.grid != self.grid or other.dim != self.dim:
            raise StatsError("cannot merge spectra of different grids or channel counts")
        else:
            self.spec = self.spec + other.spec.to(self.spec.device)
        self.count += other.count
        return self

    def autocorrelation(self) -> torch.Tensor:
        """``R_y`` (f, f, H, W) float64, the mean over maps of ``Σ_x y_f(x) y_g(x + Δ)``."""
        if self.spec is None or not self.count:
            raise StatsError("no maps were added; the key spectrum is empty")
        return torch.fft.irfft2(self.spec, s=self.grid) / self.count

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.spec is None:
            raise StatsError("no maps were added; nothing to save")
        return {"count": torch.tensor([self.count], dtype=torch.int64),
                "grid": torch.tensor(self.grid, dtype=torch.int64),
                "real": self.spec.real.contiguous().cpu(), "imag": self.spec.imag.contiguous().cpu()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        try:
            self.count = int(state["count"].reshape(-1)[0])
            self.grid = tuple(int(g) for g in state["grid"].tolist())
            self.spec = torch.complex(state["real"].double(), state["imag"].double())
        except (KeyError, RuntimeError) as e:
            raise StatsError(f"key spectrum file is malformed ({e})") from None

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        """Write atomically as safetensors (real and imaginary parts); ``metadata`` (default :attr:`meta`)
        goes in the header."""
        state = self.state_dict()
        header = {"format": SPECTRUM_FORMAT,
                  "meta": json.dumps(self.meta if metadata is None else metadata, sort_keys=True, default=str),
                  "sha256": tensors_checksum(state)}
        return atomic_save(state, Path(path), header)

    @classmethod
    def load(cls, path: str | Path) -> "KeySpectrum":
        """Read a spectrum saved by :meth:`save` (checked as :func:`~rulewriter.core.stats.read_statistics`
        checks statistics); its metadata is on :attr:`meta`, the file on :attr:`source`."""
        tensors, _, meta = read_statistics(path, SPECTRUM_FORMAT, "a rulewriter key spectrum")
        s = cls()
        try:
            s.load_state_dict(tensors)
        except StatsError as e:
            raise StatsError(f"{path}: {e}") from None
        if s.count < 1:
            raise StatsError(f"{path}: the key spectrum holds no maps (count {s.count})")
        s.meta, s.source = meta, Path(path)
        return s

    def check_model(self, classifier, source: str | Path | None = None) -> None:
        """Refuse (StatsError) a spectrum made for another model or other weights (:func:`check_made_for`)."""
        check_made_for(self.meta, classifier, source)


def _output_maps(mem: LayerMemory, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The layer's output maps without bias, (B, f, H, W); Linear outputs become (B, f, L, 1)."""
    return LayerMemory(mem.module, 3, name=mem.name).keys(x, y)


def collect_key_spectrum(
    classifier,
    layer: str,
    data,
    *,
    samples: int | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> KeySpectrum:
    """Stream images to ``layer`` and collect the :class:`KeySpectrum` of its output maps (for ``fourier``).

    Arguments as :func:`~rulewriter.core.stats.collect_second_moment` (same data sources, subsampling and cache
    keys); ``device=None`` runs the model where it is, and the model is back on its own device afterwards.
    Images are fed in the model's dtype. Example:

        >>> spec = collect_key_spectrum(clf, "_conv_stem", "photos/", samples=200)       # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    model = classifier.model
    mem = LayerMemory(get_module(model, layer), 3, name=layer)
    ds = statistics_dataset(classifier, data, samples, seed)
    if len(ds) == 0:
        raise StatsError("no images to collect statistics from")
    fingerprint = dataset_fingerprint(ds)
    if fingerprint is None and cache_dir is not None:
        # As collect_second_moment: a dataset that cannot say what it holds must not share a cache entry.
        warnings.warn(f"{type(ds).__name__} has no fingerprint() and is not a TensorDataset, so its spectrum is "
                      "not cached (define fingerprint() to cache it)", stacklevel=2)
        cache_dir = None
    meta = {"kind": "key_spectrum", "model": classifier.name, "weights": classifier.weights_id, "layer": layer,
            "data": fingerprint, "n_images": len(ds), "seed": seed,
            "preprocess": classifier.preprocess.describe()}
    cache = None
    if cache_dir is not None:
        key = stats_cache_key(meta)
        cache = Path(cache_dir).expanduser() / f"spectrum-{classifier.name}-{layer.replace('/', '_')}-{key[:16]}.safetensors"
        if cache.is_file():
            try:
                spec = KeySpectrum.load(cache)
            except StatsError as e:  # truncated or flipped bits: rebuilt below
                warnings.warn(f"the key spectrum cache entry is damaged and is rebuilt: {e}", stacklevel=2)
                spec = None
            if spec is not None and spec.meta.get("key") == key:
                return spec
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    spec = KeySpectrum()
    was_training = model.training
    p0 = next(model.parameters())
    home, dtype = p0.device, p0.dtype
    dev = home if device is None else torch.device(device)
    model.eval().to(dev)
    try:
        with torch.no_grad(), Trace(model, layer, stop=True) as tr:
            for batch in tqdm(loader, desc=f"spectrum {layer}", disable=not progress, unit="batch"):
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                tr(x.to(dev, dtype))
                spec.add(_output_maps(mem, tr.input, tr.output))
    finally:
        model.to(home)
        model.train(was_training)
    if cache is not None:
        spec.save(cache, {**meta, "key": stats_cache_key(meta), "count": spec.count})
    return spec


def _pads(mem: LayerMemory) -> tuple[int, int]:
    """Total top and left padding (module padding plus a static-padding module)."""
    if mem.kind == "linear":
        return 0, 0
    left, _, top, _ = mem.module._reversed_padding_repeated_twice
    sp = getattr(mem.module, "static_padding", None)
    extra = getattr(sp, "padding", 0) if isinstance(sp, nn.Module) else 0
    extra = [extra] * 4 if isinstance(extra, int) else list(extra)
    return int(top) + int(extra[2]), int(left) + int(extra[0])


def _phase_taps(mem: LayerMemory) -> dict[tuple[int, int], list[tuple[int, int, int, int]]]:
    """For each input phase φ, the taps ``(a_h, a_w, e_h, e_w)`` of the adjoint convolution.

    The layer computes ``y(i) = Σ_a W(a) x(s·i + d·a − p)``. An input pixel ``u = s·j + φ`` is read by tap
    ``a`` when ``d·a − p ≡ φ (mod s)``, from the output ``i = j − e`` with ``e = (d·a − p − φ) / s``; so
    each phase of the input is a stride-1 convolution of the output map (a polyphase decomposition).
    """
    (kh, kw), (sh, sw), (dh, dw) = mem.kernel, mem.stride, mem.dilation
    pt, pl = _pads(mem)
    out: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for ah in range(kh):
        qh = dh * ah - pt
        for aw in range(kw):
            qw = dw * aw - pl
            phase = (qh % sh, qw % sw)
            out.setdefault(phase, []).append((ah, aw, (qh - phase[0]) // sh, (qw - phase[1]) // sw))
    return out


def fourier_layer_update(
    mem: LayerMemory,
    spectrum: KeySpectrum,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    ridge: float = DEFAULT_RIDGE,
) -> torch.Tensor:
    """The layer's weight change (float64, the weight's shape) from eqs. 3.52–3.57 in the inverse direction.

    The inverse memory is the adjoint convolution ``x ≈ M ⊛ y`` (``M[c, f, a] = W[f, c, a]``). Following
    Section 2.1.4 its data term takes the values the memory recalls, ``V = M0 ⊛ y``, so ``M0`` is the
    least-squares solution (eq. 3.38 holds) and the objective is the collateral change ``Σ‖ΔM ⊛ y‖²``
    over the output maps of ``spectrum``, subject to ``(M0 + ΔM) ⊛ k* = v*`` for the constant map ``k*``
    (eq. 3.46). A strided layer is split into input phases (:func:`_phase_taps`); each phase is a stride-1
    convolution with its own taps and gets the closed form on its Toeplitz-block ``C`` built from ``R_y``
    (eq. 3.36, by FFT). ``keys`` (f, r) and ``values`` (c, r) are the constraint pairs, one per column.

    For a 1×1 stride-1 layer ``C = R_y(0) = E[y yᵀ]``: the update equals the ``transpose`` solver's.
    """
    if spectrum.dim != mem.f:
        raise StatsError(f"the spectrum has {spectrum.dim} channels; {mem.name!r} has {mem.f} outputs")
    keys, values = _as_cols(keys, mem.f, "keys"), _as_cols(values, mem.c, "values")
    r_y = spectrum.autocorrelation()
    w0 = mem.weight.detach().double()
    w0 = w0[:, :, None, None] if w0.dim() == 2 else w0
    dw = torch.zeros_like(w0)
    for phase, taps in _phase_taps(mem).items():
        ah = torch.tensor([t[0] for t in taps])
        aw = torch.tensor([t[1] for t in taps])
        offsets = torch.tensor([(-t[2], -t[3]) for t in taps])  # x_φ(j) reads y(j − e) = y(j + δ)
        c = _toeplitz(r_y, offsets)
        m0 = w0[:, :, ah, aw].permute(1, 0, 2).reshape(mem.c, -1)  # (c, (f, t))
        kappa = keys.repeat_interleave(len(taps), dim=0)
        d = update_direction(c, kappa, ridge).to(m0.device)  # the spectrum may live on the CPU, the layer on a GPU
        lam = solve_lambda(m0, kappa, values, d)
        dw[:, :, ah, aw] = (lam @ d.T).reshape(mem.c, mem.f, len(taps)).permute(1, 0, 2)
    return dw.reshape(mem.weight.shape)
