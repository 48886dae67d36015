"""Monotone lookup tables of an operator's time over its shape, so that pricing one iteration costs microseconds.

A fitted regressor (``cost_models.fitted``) is evaluated once, at fit time, on a grid of shapes; the simulator then
only reads the grid:

- ``IntTable``: exact values at integer sizes ``1..n`` (token counts, sequences).
- ``LogGrid``: values on a product of per-axis point lists (1 to 3 axes, e.g. (chunk, context) or
  (batch, total KV, batch x longest KV)); a query is interpolated multilinearly in ``log1p`` of each coordinate on
  ``log`` of the time, i.e. piecewise power laws between grid points.

Both are made monotone non-decreasing along every axis, because physics says a larger shape never takes less
time: a kernel given more tokens, sequences or context could always have padded the smaller one. ``IntTable``
takes the least-squares monotone fit of the log times (isotonic regression by pool-adjacent-violators, scikit-
learn), which averages a kernel's alignment zigzag (e.g. GEMMs faster at multiples of 4 rows on a CPU) instead of
lifting every later size to one slow size; ``LogGrid`` takes a running maximum axis after axis (the smallest
monotone grid above the fitted values). Multilinear interpolation of a monotone grid is monotone.

Beyond the grid's upper end a coordinate is clamped, and the value is ``max(table(clamped), s x proxy(x))``:
``proxy`` is the operator's non-negative linear work model (``cost_models.fitted``) and ``s`` the smallest
ratio ``table/proxy`` on the grid's upper faces, so the extension is continuous at the boundary, monotone, and
grows like the work. Coordinates below the first point are clamped to it.
"""
from __future__ import annotations

import math
from bisect import bisect_right

import numpy as np


def monotone(values: np.ndarray) -> np.ndarray:
    """Running maximum along every axis in turn (the least array >= ``values`` non-decreasing along all axes)."""
    out = np.asarray(values, dtype=float)
    for axis in range(out.ndim):
        out = np.maximum.accumulate(out, axis=axis)
    return out


def geometric_points(lo: float, hi: float, ratio: float, dense_upto: int = 8) -> list[float]:
    """``lo..dense_upto`` integers, then points growing by ``ratio`` to ``hi`` (included), for a grid axis."""
    pts = [float(v) for v in range(int(lo), min(int(dense_upto), int(hi)) + 1)]
    if not pts:
        pts = [float(lo)]
    v = pts[-1]
    while v < hi:
        v = min(float(hi), max(v + 1.0, math.floor(v * ratio)))
        pts.append(v)
    return pts


def isotonic(values) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` (> 0) in squared log error (isotonic regression)."""
    from sklearn.isotonic import IsotonicRegression

    logv = np.log(np.maximum(np.asarray(values, dtype=float), 1e-12))
    fitted = IsotonicRegression().fit_transform(np.arange(len(logv)), logv)
    return np.maximum.accumulate(np.exp(fitted))      # exact monotonicity after exp's rounding


class IntTable:
    """Seconds at integer sizes ``1..len(values)``; ``proxy(x)`` extends it beyond the end (see module docstring).

    Args:
        values: times at sizes 1..n (seconds), made monotone here (``isotonic``).
        proxy: callable size -> work estimate (> 0, non-decreasing), or None to stay constant past the end.
    """

    def __init__(self, values, proxy=None):
        self.values = isotonic(values).tolist()
        self.n = len(self.values)
        self.proxy = proxy
        self.scale = self.values[-1] / proxy(self.n) if proxy is not None else 0.0

    def __call__(self, x: int) -> float:
        if x <= self.n:
            return self.values[max(int(x), 1) - 1]
        last = self.values[-1]
        return max(last, self.scale * self.proxy(x)) if self.proxy is not None else last

    def __getstate__(self):
        return {"values": self.values, "n": self.n, "scale": self.scale, "proxy": self.proxy}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def to_arrays(self, prefix: str) -> dict:
        """Plain numpy arrays (for ``np.savez``, no pickling): values, scale, the proxy's terms."""
        out = {f"{prefix}values": np.asarray(self.values, dtype=float), f"{prefix}scale": np.float64(self.scale)}
        if self.proxy is not None:
            out[f"{prefix}proxy_coef"] = np.asarray(self.proxy.coef, dtype=float)
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str, proxy_factory) -> "IntTable":
        """The table ``to_arrays`` wrote (``proxy_factory(coef)`` rebuilds the proxy); no refitting, no sklearn."""
        t = cls.__new__(cls)
        t.values = arrays[f"{prefix}values"].tolist()
        t.n = len(t.values)
        t.scale = float(arrays[f"{prefix}scale"])
        key = f"{prefix}proxy_coef"
        t.proxy = proxy_factory(arrays[key].tolist()) if key in arrays else None
        return t


class LogGrid:
    """Seconds on the grid ``axes[0] x axes[1] x ...`` (points ascending, >= 0), interpolated multilinearly in
    ``log1p`` coordinates on ``log`` time; extended past the upper ends with ``proxy`` (see module docstring).

    Args:
        axes: one ascending list of points per coordinate (1 to 3 coordinates).
        values: array of shape ``[len(a) for a in axes]`` (seconds > 0), made monotone here.
        proxy: callable ``proxy(*x)`` -> work estimate (> 0, non-decreasing in each coordinate; it must accept
            numpy arrays too), or None.
    """

    def __init__(self, axes, values, proxy=None):
        self.axes = [[float(p) for p in a] for a in axes]
        vals = monotone(np.maximum(np.asarray(values, dtype=float), 1e-12))
        if vals.shape != tuple(len(a) for a in self.axes):
            raise ValueError(f"LogGrid: values of shape {vals.shape} do not match axes {[len(a) for a in axes]}")
        self.logx = [[math.log1p(p) for p in a] for a in self.axes]
        self.logv = np.log(vals).ravel().tolist()
        self.strides = [int(s // vals.itemsize) for s in np.log(vals).strides]
        self.proxy = proxy
        self.scale = self._face_scale(vals) if proxy is not None else 0.0

    def _face_scale(self, vals: np.ndarray) -> float:
        """min of value/proxy over the grid points on an upper face (where any coordinate is at its last point)."""
        mesh = np.meshgrid(*[np.asarray(a) for a in self.axes], indexing="ij")
        on_face = np.zeros(vals.shape, dtype=bool)
        for d, a in enumerate(self.axes):
            on_face |= np.indices(vals.shape)[d] == len(a) - 1
        ratio = vals[on_face] / np.asarray(self.proxy(*[m[on_face] for m in mesh]), dtype=float)
        return float(ratio.min())

    def _interp(self, xs) -> float:
        base = 0
        parts = []                              # (stride, weight of the upper point) of each axis between points
        for x, axis, lx, stride in zip(xs, self.axes, self.logx, self.strides):
            n = len(axis)
            if n == 1 or x <= axis[0]:
                continue                        # the first point, weight 1
            if x >= axis[-1]:
                base += (n - 1) * stride        # the last point, weight 1
                continue
            i = bisect_right(axis, x) - 1
            w = (math.log1p(x) - lx[i]) / (lx[i + 1] - lx[i])
            base += i * stride
            if w > 0.0:
                parts.append((stride, w))
        # the cell's corners, the lower point of the first axis before its upper one, weights multiplied in axis
        # order; written out for up to 3 axes (a corner of weight 0 adds a zero)
        v = self.logv
        if not parts:
            return math.exp(v[base])
        (s0, w0), *rest = parts
        a0, b0 = 1.0 - w0, w0
        if not rest:
            return math.exp(a0 * v[base] + b0 * v[base + s0])
        (s1, w1), *rest = rest
        u1 = 1.0 - w1
        c = (a0 * u1, b0 * u1, a0 * w1, b0 * w1)
        if not rest:
            return math.exp(c[0] * v[base] + c[1] * v[base + s0] + c[2] * v[base + s1] + c[3] * v[base + s0 + s1])
        (s2, w2), = rest
        u2, top = 1.0 - w2, base + s2
        return math.exp(c[0] * u2 * v[base] + c[1] * u2 * v[base + s0] + c[2] * u2 * v[base + s1]
                        + c[3] * u2 * v[base + s0 + s1] + c[0] * w2 * v[top] + c[1] * w2 * v[top + s0]
                        + c[2] * w2 * v[top + s1] + c[3] * w2 * v[top + s0 + s1])

    def __call__(self, *x) -> float:
        value = self._interp(x)
        if self.proxy is not None:
            for xi, a in zip(x, self.axes):
                if xi > a[-1]:
                    return max(value, self.scale * self.proxy(*x))
        return value

    def __getstate__(self):
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)

    def to_arrays(self, prefix: str) -> dict:
        """Plain numpy arrays (for ``np.savez``): axes, log values, strides, scale, the proxy's terms."""
        out = {f"{prefix}logv": np.asarray(self.logv, dtype=float), f"{prefix}strides": np.asarray(self.strides),
               f"{prefix}scale": np.float64(self.scale), f"{prefix}naxes": np.int64(len(self.axes))}
        for d, axis in enumerate(self.axes):
            out[f"{prefix}axis{d}"] = np.asarray(axis, dtype=float)
        if self.proxy is not None:
            out[f"{prefix}proxy_coef"] = np.asarray(self.proxy.coef, dtype=float)
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str, proxy_factory) -> "LogGrid":
        """The grid ``to_arrays`` wrote; the same lookups as the original (``logx`` recomputed with math.log1p)."""
        g = cls.__new__(cls)
        g.axes = [arrays[f"{prefix}axis{d}"].tolist() for d in range(int(arrays[f"{prefix}naxes"]))]
        g.logx = [[math.log1p(p) for p in a] for a in g.axes]
        g.logv = arrays[f"{prefix}logv"].tolist()
        g.strides = [int(v) for v in arrays[f"{prefix}strides"]]
        g.scale = float(arrays[f"{prefix}scale"])
        key = f"{prefix}proxy_coef"
        g.proxy = proxy_factory(arrays[key].tolist()) if key in arrays else None
        return g
