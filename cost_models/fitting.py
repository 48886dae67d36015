"""Fitting per-operator cost models to a profile: the work proxy, the proxy-times-trees regressor, the lookup
tables' grids, the held-out error and the cross-validated fit of every operator (``servesim fit``).

The method and the file formats are described in ``cost_models.fitted``, which holds what a simulation needs to
price batches with the result (and imports neither pandas nor scikit-learn); this module needs both.
Errors are ``FitError`` (a ValueError) naming the operator and the field.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin

from cost_models.fitted import (CLASS_COLUMNS, DECODE_SPREAD, FIT_VERSION, MIN_ROWS_FOR_ERROR, OPERATOR_CLASS,
                                FitError, FittedProfile, OperatorReport, Proxy, profiled_ranges, proxy_terms)
from cost_models.lookup import IntTable, LogGrid, geometric_points


# --- the work proxy --------------------------------------------------------------------------------------------

def grid_coords(op_class: str, X: np.ndarray) -> list[np.ndarray]:
    """Grid coordinates of the rows ``X`` (columns ``CLASS_COLUMNS[op_class]``); decode (b, S, M) -> (b, S/b, bM/S)."""
    X = np.asarray(X, dtype=float)
    if op_class == "decode":
        return [X[:, 0], X[:, 1] / X[:, 0], X[:, 0] * X[:, 2] / X[:, 1]]
    return [X[:, i] for i in range(X.shape[1])]


def tree_features(op_class: str, X: np.ndarray) -> np.ndarray:
    """log1p of the class's features; token and sequence counts also get their alignment, log2 of the largest
    power of two dividing them (capped at 64): GEMM and vector kernels run faster on sizes that are multiples of
    their tile or vector width (NVIDIA, "Matrix Multiplication Background User's Guide", 2023, on dimensions that
    are multiples of 8/16/64; MKL shows the same on CPUs), which the trees can then learn."""
    X = np.asarray(X, dtype=float)
    if op_class == "prefill":
        X = np.column_stack([X[:, 0], X[:, 1], X[:, 0] * X[:, 1]])
    features = np.log1p(X)
    if op_class in ("token", "sequence", "head"):
        n = np.maximum(X[:, 0], 1).astype(np.int64)
        features = np.column_stack([features, np.minimum(np.log2((n & -n).astype(float)), 6.0)])
    return features


def fit_proxy(op_class: str, X: np.ndarray, y: np.ndarray) -> Proxy:
    """Non-negative least squares of relative error: minimise sum ((proxy(x) - y) / y)^2 over weights >= 0."""
    from sklearn.linear_model import LinearRegression

    coords = grid_coords(op_class, X)
    terms = np.column_stack([np.broadcast_to(np.asarray(t, dtype=float), y.shape)
                             for t in proxy_terms(op_class, *coords)])
    scale = terms.max(axis=0)
    scale[scale <= 0] = 1.0
    lr = LinearRegression(positive=True, fit_intercept=False).fit(terms / scale, y, sample_weight=1.0 / y ** 2)
    coef = lr.coef_ / scale
    coef[0] = max(coef[0], 0.01 * float(y.min()))     # keep the proxy > 0 at every shape
    return Proxy(op_class, coef)


# --- the regressor ---------------------------------------------------------------------------------------------

def _tree_cls(kind: str):
    from sklearn.ensemble import ExtraTreesRegressor, RandomForestRegressor

    return ExtraTreesRegressor if kind == "extra" else RandomForestRegressor


class ProxyTreeRegressor(RegressorMixin, BaseEstimator):
    """``time = proxy(x) x exp(trees(log1p features))`` (see the module docstring); a scikit-learn estimator.

    ``X`` columns are ``CLASS_COLUMNS[op_class]``; ``y`` seconds (> 0).
    """

    def __init__(self, op_class: str = "token", trees: str = "extra", n_estimators: int = 40,
                 min_samples_leaf: int = 1, random_state: int = 0):
        self.op_class = op_class
        self.trees = trees
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.random_state = random_state

    def fit(self, X, y):
        X, y = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
        self.proxy_ = fit_proxy(self.op_class, X, y)
        base = np.asarray(self.proxy_(*grid_coords(self.op_class, X)), dtype=float)
        # no bootstrap for the forest: every tree sees every row, so a profiled shape is priced at its measured time
        # (a bootstrap left B = 1 out of a third of the trees, which then priced it as B = 2: a quick CPU profile's
        # lm_head, measured 1.99 ms at B = 1 and 3.50 ms at B = 2, was fitted as 2.53 ms at B = 1)
        extra = {} if self.trees == "extra" else {"bootstrap": False, "max_features": 0.5}
        self.trees_ = _tree_cls(self.trees)(n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf,
                                            random_state=self.random_state, n_jobs=1, **extra)
        self.trees_.fit(tree_features(self.op_class, X), np.log(y / base))
        return self

    def predict(self, X):
        X = np.asarray(X, dtype=float)
        base = np.asarray(self.proxy_(*grid_coords(self.op_class, X)), dtype=float)
        return base * np.exp(self.trees_.predict(tree_features(self.op_class, X)))


def median_ape(y_true, y_pred) -> float:
    """Median absolute percentage error (%)."""
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    return float(np.median(np.abs(y_pred / y_true - 1.0)) * 100.0)


# --- lookup tables ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TableBounds:
    """Least upper ends of the lookup tables (the profiled range is always covered too)."""

    tokens: int = 16384
    sequences: int = 1024
    chunk: int = 16384
    context: int = 131072
    decode_batch: int = 256
    kv_len: int = 65536
    message_bytes: int = 1 << 31


def build_table(op_class: str, estimator, X: np.ndarray, bounds: TableBounds = TableBounds()):
    """Evaluate ``estimator`` on the class's grid (covering the profiled rows ``X`` and ``bounds``)."""
    X = np.asarray(X, dtype=float)
    proxy = estimator.proxy_
    if op_class in ("token", "sequence"):
        n = int(max(X[:, 0].max(), bounds.tokens if op_class == "token" else bounds.sequences))
        values = estimator.predict(np.arange(1, n + 1, dtype=float)[:, None])
        return IntTable(values, proxy)
    if op_class == "head":          # (B, T), priced at T >= B (an iteration has a token per sequence at least)
        # the axes are the profiled values, geometric past them: the few profiled B are far apart, and the trees'
        # residual at a B between two of them, taken from either, times the proxy there could exceed the next one
        axes = []
        for col, hi in ((0, bounds.sequences), (1, bounds.tokens)):
            seen = sorted(set(X[:, col].tolist()))
            axes.append(seen + [p for p in geometric_points(1, max(seen[-1], hi), 1.25) if p > seen[-1]])
        b, t = np.meshgrid(*axes, indexing="ij")
        values = estimator.predict(np.column_stack([b.ravel(), np.maximum(t, b).ravel()])).reshape(b.shape)
        return LogGrid(axes, values, proxy)
    if op_class == "collective":
        axis = geometric_points(1, max(X[:, 0].max(), bounds.message_bytes), 1.25)
        return LogGrid([axis], estimator.predict(np.asarray(axis)[:, None]), proxy)
    if op_class == "prefill":
        c_axis = geometric_points(1, max(X[:, 0].max(), bounds.chunk), 1.2)
        k_axis = [0.0] + geometric_points(1, max(X[:, 1].max(), bounds.context), 1.25)
        c, k = np.meshgrid(c_axis, k_axis, indexing="ij")
        values = estimator.predict(np.column_stack([c.ravel(), k.ravel()])).reshape(c.shape)
        return LogGrid([c_axis, k_axis], values, proxy)
    if op_class == "decode":
        b_max = max(X[:, 0].max(), bounds.decode_batch)
        b_axis = geometric_points(1, b_max, 1.2)
        m_axis = geometric_points(1, max(X[:, 2].max(), bounds.kv_len), 1.25)
        u_axis = [u for u in DECODE_SPREAD if u < b_max] + [float(b_max)]
        b, m, u = np.meshgrid(b_axis, m_axis, u_axis, indexing="ij")
        s = b * m
        longest = np.clip(u * s, s, b * s) / b          # S <= b x M <= b x S
        values = estimator.predict(np.column_stack([b.ravel(), s.ravel(), longest.ravel()])).reshape(b.shape)
        return LogGrid([b_axis, m_axis, u_axis], values, proxy)
    raise FitError(f"unknown operator class {op_class!r}")


def table_predict(op_class: str, table, X: np.ndarray) -> np.ndarray:
    """Price the rows ``X`` through a table exactly as the simulator does (scalar lookups)."""
    coords = grid_coords(op_class, X)
    return np.array([table(*(float(c[i]) for c in coords)) if op_class != "token" and op_class != "sequence"
                     else table(int(coords[0][i])) for i in range(len(X))])



# --- fitting ----------------------------------------------------------------------------------------------------

def profile_hash(df: pd.DataFrame, settings: dict) -> str:
    """sha256 of the profile rows (sorted, CSV) and the fit settings: the key of a fitted model."""
    cols = ["operator", *sorted(c for c in df.columns if c != "operator")]
    body = df[cols].sort_values(cols).to_csv(index=False).encode()
    return hashlib.sha256(body + json.dumps(settings, sort_keys=True).encode()).hexdigest()


def fit_operator(op: str, X: np.ndarray, y: np.ndarray, *, seed: int = 0, bounds: TableBounds = TableBounds(),
                 n_estimators: int = 40):
    """Cross-validated fit of one operator: returns (final estimator, final table, OperatorReport)."""
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GridSearchCV, KFold, train_test_split

    op_class = OPERATOR_CLASS[op]
    grid = {"trees": ["extra", "forest"]}          # leaves of one row (see cost_models.fitted)
    scorer = make_scorer(median_ape, greater_is_better=False)

    def search(Xs, ys):
        if len(ys) < 6:
            return ProxyTreeRegressor(op_class, n_estimators=n_estimators, random_state=seed).fit(Xs, ys), {}
        cv = KFold(n_splits=3, shuffle=True, random_state=seed)
        gs = GridSearchCV(ProxyTreeRegressor(op_class, n_estimators=n_estimators, random_state=seed), grid,
                          scoring=scorer, cv=cv, n_jobs=1, refit=True)
        gs.fit(Xs, ys)
        return gs.best_estimator_, gs.best_params_

    idx = np.arange(len(y))
    med = p90 = float("nan")
    held = 0
    if len(y) >= 5:
        train, test = train_test_split(idx, test_size=0.2, random_state=seed)
        est, params = search(X[train], y[train])
        pred = table_predict(op_class, build_table(op_class, est, X[train], bounds), X[test])
        ape = np.abs(pred / y[test] - 1.0) * 100.0
        med, p90, held = float(np.median(ape)), float(np.percentile(ape, 90)), len(test)
    else:
        params = {}
    final = ProxyTreeRegressor(op_class, n_estimators=n_estimators, random_state=seed, **params).fit(X, y)
    table = build_table(op_class, final, X, bounds)
    report = OperatorReport(op, op_class, len(y), held, med, p90, params, len(y) >= MIN_ROWS_FOR_ERROR)
    return final, table, report


def aggregate_rows(df: pd.DataFrame, op: str) -> tuple[np.ndarray, np.ndarray]:
    """One (shape, median seconds) per distinct shape of ``op``: duplicate rows are merged by their median."""
    cols = list(CLASS_COLUMNS[OPERATOR_CLASS[op]])
    sub = df[df["operator"] == op]
    missing = [c for c in cols if c not in sub.columns]
    if missing:
        raise FitError(f"operator {op}: profile lacks column(s) {', '.join(missing)}")
    g = sub.groupby(cols, as_index=False)["time_median_s"].median()
    g = g[g["time_median_s"] > 0]
    return g[cols].to_numpy(dtype=float), g["time_median_s"].to_numpy(dtype=float)


def fit_profile(df: pd.DataFrame, meta: dict, *, seed: int = 0, cpu_overhead_s: float | None = None,
                bounds: TableBounds = TableBounds(), progress=None) -> FittedProfile:
    """Fit every known operator in the profile rows ``df`` (``profiler.schema`` columns; ``meta`` as in
    meta.json, with ``model_shape``). ``progress(op)`` is called before each operator. Raises FitError when no
    operator can be fitted. Unknown operator names are skipped and noted."""
    settings = {"seed": seed, "version": FIT_VERSION, "bounds": bounds.__dict__, "cpu_overhead_s": cpu_overhead_s}
    key = profile_hash(df, settings)
    tables, estimators, reports, notes, ranges = {}, {}, [], [], {}
    for op in sorted(df["operator"].unique()):
        if op not in OPERATOR_CLASS:
            notes.append(f"operator {op}: unknown, not fitted")
            continue
        X, y = aggregate_rows(df, op)
        if len(y) == 0:
            notes.append(f"operator {op}: no rows with a positive time, not fitted")
            continue
        if progress:
            progress(op)
        est, table, report = fit_operator(op, X, y, seed=seed, bounds=bounds)
        tables[op], estimators[op] = table, est
        ranges[op] = profiled_ranges(OPERATOR_CLASS[op], grid_coords(OPERATOR_CLASS[op], X))
        reports.append(report)
    if not tables:
        raise FitError("profile has no operator this servesim can fit; known: " + ", ".join(OPERATOR_CLASS))
    return FittedProfile(key, dict(meta), tables, estimators, reports, cpu_overhead_s, notes, ranges)



def format_report(fitted: FittedProfile) -> str:
    """A table of the held-out error per operator (what ``servesim fit`` prints)."""
    lines = [f"{'operator':<26} {'class':<10} {'rows':>5} {'held-out':>8} {'median APE':>10} {'p90 APE':>8}  model"]
    for r in sorted(fitted.reports, key=lambda r: r.operator):
        med = "-" if math.isnan(r.median_ape) else f"{r.median_ape:.1f}%"
        p90 = "-" if math.isnan(r.p90_ape) else f"{r.p90_ape:.1f}%"
        params = ", ".join(f"{k}={v}" for k, v in sorted(r.best_params.items())) or "defaults"
        flag = "" if r.enough_samples else "  (few samples)"
        lines.append(f"{r.operator:<26} {r.op_class:<10} {r.rows:>5} {r.heldout_rows:>8} {med:>10} {p90:>8}  "
                     f"{params}{flag}")
    return "\n".join(lines)
