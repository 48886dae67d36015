"""Fitted per-operator cost models: regressors fitted to a profile, turned into lookup tables, saved with joblib,
and a ``CostModel`` that prices a ``BatchPlan`` with them.

Method (after Vidur, Agrawal et al., MLSys 2024, §5: one scikit-learn regressor per operator, fitted to profiled
medians and evaluated on the shapes a simulation reaches). Per operator, by its class:

===========  ====================================  =========================  ===================================
class        operators                             tree features (log1p)      work proxy terms (>= 0 weights)
===========  ====================================  =========================  ===================================
token        norms, QKV/O/up/down projections,     T (tokens), alignment of T 1, T
             RoPE, KV-cache save, act, add, emb
sequence     lm_head, cpu_overhead                 B (sequences), alignment   1, B
prefill      attn_prefill (one chunk)              c, k, c x k                1, c, c x k, c^2, k
decode       attn_decode (the decode batch)        b, S (total KV), M (max)   1, b, S, b x M
collective   all_reduce, send_recv                 message bytes              1, bytes
===========  ====================================  =========================  ===================================

``ProxyTreeRegressor`` first fits the non-negative linear *work proxy* to the times by relative least squares
(the terms are the FLOP and byte counts of the roofline up to constants: Williams et al., CACM 2009), then an
ensemble of trees (extra trees or a random forest; a 3-fold cross-validated grid picks which, and the leaf size)
to ``log(time / proxy)``. Trees alone interpolate in steps and cannot extrapolate; the proxy carries the scale and
the trees the residual efficiency, which varies slowly — so held-out error stays small on a coarse grid, and past
the profiled shapes a prediction grows with the work instead of staying flat.

The held-out error is measured honestly on what the simulator uses: 20% of each operator's rows are held out
(seeded), a model is fitted to the rest and turned into tables, and the held-out rows are priced through them.
The final model is then refitted on all rows. Tables (``cost_models.lookup``) are monotone, so a larger shape is
never cheaper where physics says so: token operators at every T = 1..max(profiled, 16384); prefill attention on a
(chunk, context) grid; decode attention on a (b, m, u) grid — b sequences of mean KV length m = S/b and spread
u = b x M / S >= 1 (1 for equal lengths; the padded work b x M is u x S). These axes are each "more work at the
same rest": more sequences of the same length, longer sequences, more padding. Total KV S is not an axis because
at equal S more, shorter sequences can run faster on a GPU (FlashAttention parallelises over sequences: Vidur's
A100 decode table has such cases); spread is the third axis rather than b x M because some kernels switch paths at
u = 1 (``profiler.ops`` skips the padding mask for equal lengths), and a grid in (S, b x M) would average the two
paths across its diagonal.

Pricing an iteration (``FittedCostModel``): per layer, the token operators at the iteration's total tokens
(``add`` twice: after attention and after the MLP), ``attn_prefill`` summed over the prefill chunks,
``attn_decode`` for the decode batch, and with ``tp > 1`` the layer's all-reduces of the activations; times the
layers of each pipeline stage (``stage_time``); plus ``emb`` on the first stage, ``lm_head`` (one row per
sequence) on the last, ``cpu_overhead`` split between them as the roofline's (``CPU_OVERHEAD_FIRST_STAGE``),
``send_recv`` between stages (``transfer_time``). ``cpu_overhead`` is the profiled operator by the number of
sequences (``servesim profile`` times input preparation and greedy sampling; Vidur's tables the engine's scheduling,
input preparation, sampling and output processing), or a configured constant (``fit_profile(cpu_overhead_s=)``); a
profile with neither is charged the engine overhead of ``FittedCostModel(engine=)`` (a ``cost_models.engine_overhead``
profile; default: ``none`` for a CPU profile, else the roofline's default engine). Operators the profile lacks are
priced by the roofline model (``breakdown`` keeps the roofline's names) and listed in ``FittedCostModel.fallbacks``.

Files: ``servesim fit`` writes ``MODEL_DIR/model.json`` (readable summary) and
``MODEL_DIR/fitted-<profile hash>.joblib``; ``load_cost_model(MODEL_DIR, model=, device=, tp=, pp=)`` reads them.
Errors are ``FitError`` (a ValueError) naming the folder and the field.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cost_models.lookup import IntTable, LogGrid, geometric_points

FIT_VERSION = 2
MODEL_JSON = "model.json"
TOKEN_OPERATORS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_kv_cache_save", "attn_post_proj",
                   "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
OPERATOR_CLASS = {**{op: "token" for op in TOKEN_OPERATORS}, "emb": "token", "lm_head": "sequence",
                  "cpu_overhead": "sequence", "attn_prefill": "prefill", "attn_decode": "decode",
                  "all_reduce": "collective", "send_recv": "collective"}
CLASS_COLUMNS = {"token": ("num_tokens",), "sequence": ("batch_size",), "prefill": ("chunk_size", "context_len"),
                 "decode": ("batch_size", "kv_total", "kv_len"), "collective": ("message_bytes",)}
LAYER_COUNT = {"add": 2}          # a decoder layer has two residual adds; the profile times one
DECODE_SPREAD = (1.0, 1.05, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0, 64.0, 128.0)
MIN_ROWS_FOR_ERROR = 25           # operators with fewer rows are fitted but flagged "few samples"


class FitError(ValueError):
    """A profile that cannot be fitted, or a fitted model that does not match what it is asked to price."""


# --- the work proxy --------------------------------------------------------------------------------------------

def proxy_terms(op_class: str, *x):
    """Work terms of the class at grid coordinates ``x`` (scalars or numpy arrays); decode coordinates are
    (b, m = S / b, u = b x M / S): total KV S = b x m and padded work b x M = u x S."""
    if op_class == "prefill":
        c, k = x
        return [1.0, c, c * k, c * c, k]
    if op_class == "decode":
        b, m, u = x
        return [1.0, b, b * m, u * b * m]
    (n,) = x
    return [1.0, n]


class Proxy:
    """``coef . proxy_terms(op_class, *x)``: an operator's non-negative linear work model (seconds)."""

    def __init__(self, op_class: str, coef):
        self.op_class = op_class
        self.coef = [float(c) for c in coef]

    def __call__(self, *x):
        return sum(c * t for c, t in zip(self.coef, proxy_terms(self.op_class, *x)) if c)


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
    if op_class in ("token", "sequence"):
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


try:
    from sklearn.base import BaseEstimator, RegressorMixin
except ImportError:  # pragma: no cover - scikit-learn is a core dependency
    BaseEstimator, RegressorMixin = object, object


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
        self.trees_ = _tree_cls(self.trees)(n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf,
                                            random_state=self.random_state, n_jobs=1)
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

@dataclass
class OperatorReport:
    """Held-out error of one operator's fit (percent) and the hyperparameters the cross-validation chose."""

    operator: str
    op_class: str
    rows: int
    heldout_rows: int
    median_ape: float
    p90_ape: float
    best_params: dict
    enough_samples: bool


@dataclass
class FittedProfile:
    """What ``servesim fit`` saves: per-operator lookup tables, final estimators, held-out report and context."""

    profile_hash: str
    meta: dict
    tables: dict
    estimators: dict
    reports: list
    cpu_overhead_s: float | None = None
    notes: list = field(default_factory=list)

    @property
    def operators(self) -> list[str]:
        return sorted(self.tables)


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
    grid = {"trees": ["extra", "forest"], "min_samples_leaf": [1, 3]}
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
    tables, estimators, reports, notes = {}, {}, [], []
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
        reports.append(report)
    if not tables:
        raise FitError("profile has no operator this servesim can fit; known: " + ", ".join(OPERATOR_CLASS))
    return FittedProfile(key, dict(meta), tables, estimators, reports, cpu_overhead_s, notes)


# --- save / load ------------------------------------------------------------------------------------------------

def save_fitted(fitted: FittedProfile, out_dir: str | Path) -> Path:
    """Write ``fitted-<hash12>.joblib`` and ``model.json`` into ``out_dir`` (created); returns the joblib path."""
    import joblib
    import sklearn

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"fitted-{fitted.profile_hash[:12]}.joblib"
    joblib.dump(fitted, out / name, compress=3)
    summary = {"file": name, "profile_hash": fitted.profile_hash, "fit_version": FIT_VERSION,
               "sklearn_version": sklearn.__version__, "meta": fitted.meta, "cpu_overhead_s": fitted.cpu_overhead_s,
               "operators": fitted.operators, "notes": fitted.notes,
               "heldout_error": [r.__dict__ for r in fitted.reports]}
    (out / MODEL_JSON).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return out / name


def read_fitted(path: str | Path) -> FittedProfile:
    """Load the FittedProfile of a ``servesim fit`` folder. Raises FitError when it is missing or unreadable."""
    import joblib

    path = Path(path)
    summary_path = path / MODEL_JSON
    if not summary_path.is_file():
        raise FitError(f"{path}: no {MODEL_JSON}; make the folder with `servesim fit PROFILE_DIR --out {path}`")
    try:
        summary = json.loads(summary_path.read_text())
        file = path / summary["file"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FitError(f"{summary_path}: malformed ({exc})") from None
    if not file.is_file():
        raise FitError(f"{summary_path}: field file: {file.name} not found beside it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # scikit-learn version notes on unpickling; the tables are plain data
        fitted = joblib.load(file)
    if not isinstance(fitted, FittedProfile) or fitted.profile_hash != summary.get("profile_hash"):
        raise FitError(f"{file}: not the fitted model model.json names (profile hash mismatch)")
    return fitted


# --- the cost model ---------------------------------------------------------------------------------------------

_LAYER_SHAPE = ("hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "intermediate_size", "mlp")


class FittedCostModel:
    """Prices a ``BatchPlan`` from fitted per-operator tables (see the module docstring). Units: seconds.

    Args:
        fitted: a FittedProfile (``read_fitted``). model, device: ModelSpec/DeviceSpec or names.
        tp, pp: parallel degrees; ``tp`` must be the profile's. placement: as for ``RooflineCostModel``.
        engine: the engine-overhead profile (name or ``EngineProfile``, ``cost_models.engine_overhead``) charged as
            ``cpu_overhead`` when the profile has no ``cpu_overhead`` operator and no ``cpu_overhead_s``; default
            ``none`` for a CPU profile, else the roofline's default (``DEFAULT_ENGINE``).
    Raises FitError when the model's layer shapes or ``tp`` differ from the profile's; EngineProfileError for an
    unknown engine profile.
    """

    def __init__(self, fitted: FittedProfile, model, device, *, tp: int = 1, pp: int = 1, placement=None,
                 engine=None):
        from cost_models.roofline import RooflineCostModel
        from cost_models.specs import load_device, load_model

        self.fitted = fitted
        self.model, self.device = load_model(model), load_device(device)
        self.tp, self.pp = tp, pp
        shape = fitted.meta.get("model_shape", {})
        for key in _LAYER_SHAPE:
            if key in shape and shape[key] != getattr(self.model, key):
                raise FitError(f"cost model was fitted for {shape.get('model')} ({key}={shape[key]}), not "
                               f"{self.model.name} ({key}={getattr(self.model, key)})")
        if int(shape.get("tp", tp)) != tp:
            raise FitError(f"cost model was profiled at tp={shape.get('tp')}, not tp={tp}; profile at tp={tp}")
        spec_name = fitted.meta.get("device_spec")
        if spec_name and spec_name != self.device.name:
            warnings.warn(f"cost model was fitted on {spec_name}, simulating {self.device.name}", stacklevel=2)
        if engine is None and fitted.meta.get("device") == "cpu":
            engine = "none"                 # a CPU profile without the operator: no engine to charge for
        self.roofline = RooflineCostModel(self.model, self.device, tp=tp, pp=pp, placement=placement, engine=engine)
        self.placement = self.roofline.placement
        self.stage_layers = self.roofline.stage_layers
        self.layers = self.model.num_layers / pp
        tables = dict(fitted.tables)
        self.vocab_fallback = shape.get("vocab_size", self.model.vocab_size) != self.model.vocab_size
        if self.vocab_fallback:
            tables.pop("lm_head", None)
            tables.pop("emb", None)
        self.tables = tables
        self.token_ops = [op for op in TOKEN_OPERATORS if op in tables]
        if self.model.layer_norms == 1 and "post_attention_layernorm" in self.token_ops:
            self.token_ops.remove("post_attention_layernorm")      # a parallel block has one norm
        self.token_fallback = [op for op in TOKEN_OPERATORS if op not in tables
                               and not (op == "post_attention_layernorm" and self.model.layer_norms == 1)]
        self.fallbacks = sorted(set(self.token_fallback) |
                                {op for op in ("attn_prefill", "attn_decode", "emb", "lm_head") if op not in tables} |
                                ({"all_reduce"} if tp > 1 and "all_reduce" not in tables else set()) |
                                ({"send_recv"} if pp > 1 and "send_recv" not in tables else set()) |
                                ({"cpu_overhead"} if fitted.cpu_overhead_s is None and "cpu_overhead" not in tables
                                 and self.roofline.engine.name != "none" else set()))
        self.cpu_overhead_s = fitted.cpu_overhead_s
        self._token_cache: dict[int, tuple] = {}
        self._prefill_cache: dict[tuple, float] = {}
        self._seq_cache: dict[int, tuple] = {}
        self._act_bytes = self.model.hidden_size * self.model.dtype_bytes

    # operators that depend only on the token count T (cached per T): per layer, and once per iteration
    def _token_ops(self, T: int) -> tuple:
        """``(per-layer {op: s}, per-layer total, emb seconds)`` at ``T`` tokens (cached)."""
        hit = self._token_cache.get(T)
        if hit is not None:
            return hit
        layer = {op: LAYER_COUNT.get(op, 1) * self.tables[op](T) for op in self.token_ops}
        ar = self.tables.get("all_reduce")
        if self.tp > 1 and ar is not None:
            layer["all_reduce"] = self.model.layer_all_reduces * ar(T * self._act_bytes)
        wanted = list(self.token_fallback) + (["all_reduce"] if self.tp > 1 and ar is None else [])
        roof = self.roofline._per_token_ops(T) if wanted else {}
        layer.update({op: roof[op] for op in wanted if op in roof})
        emb = self.tables["emb"](T) if "emb" in self.tables else \
            self.roofline._first_stage_ops(T, 1)["emb"]
        hit = (layer, sum(layer.values()), emb)
        if len(self._token_cache) < 65536:
            self._token_cache[T] = hit
        return hit

    def _per_sequence(self, B: int, T: int) -> tuple[float, float]:
        """(lm_head, cpu_overhead) seconds of an iteration of ``T`` tokens over ``B`` sequences (cached per B; the
        engine profile's per-token part, when it has one, added per call)."""
        hit = self._seq_cache.get(B)
        if hit is None:
            table = self.tables.get("lm_head")
            lm = table(B) if table is not None else self.roofline._last_stage_ops(B)["lm_head"]
            if self.cpu_overhead_s is not None:
                cpu = self.cpu_overhead_s
            elif "cpu_overhead" in self.tables:
                cpu = self.tables["cpu_overhead"](B)
            else:
                cpu = None                  # the engine profile's (roofline.engine_overhead), below
            hit = (lm, cpu)
            if len(self._seq_cache) < 65536:
                self._seq_cache[B] = hit
        lm, cpu = hit
        return lm, (self.roofline.engine_overhead(T, B) if cpu is None else cpu)

    def _attention(self, plan) -> tuple[float, float]:
        """Per-layer seconds of (decode attention, prefill attention)."""
        d = plan.num_decodes
        decode = prefill = 0.0
        if d:
            table = self.tables.get("attn_decode")
            ctx = plan.context_lens[:d]
            if table is not None:
                total = sum(ctx) + d
                decode = table(d, total / d, d * (max(ctx) + 1) / total)
            else:
                decode = self.roofline._attention(plan)["attn_decode"]
        if d < len(plan.num_new_tokens):
            table = self.tables.get("attn_prefill")
            if table is None:
                prefill = self.roofline._attention(plan)["attn_prefill"]
            else:
                cache = self._prefill_cache
                for n, k in zip(plan.num_new_tokens[d:], plan.context_lens[d:]):
                    v = cache.get((n, k))
                    if v is None:
                        v = table(n, k)
                        if len(cache) < 262144:
                            cache[(n, k)] = v
                    prefill += v
        return decode, prefill

    def describe(self) -> dict:
        """Provenance: the profile the model was fitted to, and what falls back to the roofline."""
        meta = self.fitted.meta
        if self.cpu_overhead_s is not None:
            engine = f"cpu_overhead_s = {self.cpu_overhead_s * 1e3:.4g} ms (configured)"
        elif "cpu_overhead" in self.tables:
            engine = "the profile's cpu_overhead operator"
        else:
            engine = f"engine profile {self.roofline.engine.describe()}"
        return {"kind": "fitted", "profile_hash": self.fitted.profile_hash[:12],
                "profiled_device": meta.get("device_spec") or meta.get("device"), "device": self.device.name,
                "source": meta.get("source", "servesim profile"), "roofline_fallbacks": self.fallbacks,
                "engine_overhead": engine, "roofline": self.roofline.describe()}

    # --- CostModel protocol ------------------------------------------------------------------------------------
    def stage_time(self, plan, stage: int) -> float:
        """Seconds stage ``stage`` spends on ``plan`` (its layers; embedding on the first stage, LM head on the last,
        and their shares of the CPU overhead)."""
        T = sum(plan.num_new_tokens)
        if T == 0:
            return 0.0
        _, layer_total, emb = self._token_ops(T)
        decode, prefill = self._attention(plan)
        t = self.stage_layers[stage] * (layer_total + decode + prefill + self.roofline._stage_extra(T, stage))
        lm, cpu = self._per_sequence(len(plan.num_new_tokens), T)
        if stage == 0:
            t += emb
        if stage == self.pp - 1:
            t += lm
        return t + self.roofline._cpu_split(cpu, stage)

    def transfer_time(self, plan, stage: int) -> float:
        """Seconds to send the activations from stage ``stage`` to ``stage + 1`` (profiled send/recv if the
        profile has it, else the link's latency + bytes / bandwidth)."""
        T = sum(plan.num_new_tokens)
        if T == 0 or stage >= self.pp - 1:
            return 0.0
        sr = self.tables.get("send_recv")
        return sr(T * self._act_bytes) if sr is not None else self.roofline.transfer_time(plan, stage)

    def iteration_time(self, plan) -> float:
        """Seconds of one micro-batch through every stage and transfer (equals the sum of ``breakdown``)."""
        T = sum(plan.num_new_tokens)
        if T == 0:
            return 0.0
        if self.pp == 1:
            _, layer_total, emb = self._token_ops(T)
            decode, prefill = self._attention(plan)
            lm, cpu = self._per_sequence(len(plan.num_new_tokens), T)
            return self.stage_layers[0] * (layer_total + decode + prefill) + emb + lm + cpu
        return sum(self.stage_time(plan, s) for s in range(self.pp)) + \
            sum(self.transfer_time(plan, s) for s in range(self.pp - 1))

    def breakdown(self, plan) -> dict[str, float]:
        """Seconds per operator for the whole micro-batch (all layers of all stages, plus once-per-iteration
        operators and ``send_recv``), roofline names; ``add`` covers both residual adds and ``all_reduce`` all of a
        layer's all-reduces."""
        T = sum(plan.num_new_tokens)
        if T == 0:
            return {}
        L = self.model.num_layers
        layer, _, emb = self._token_ops(T)
        out = {op: L * v for op, v in layer.items()}
        if self.tp > 1:
            out["all_reduce"] = out.get("all_reduce", 0.0) + sum(
                n * self.roofline._stage_extra(T, s) for s, n in enumerate(self.stage_layers))
        decode, prefill = self._attention(plan)
        if plan.num_decodes:
            out["attn_decode"] = L * decode
        if plan.num_decodes < len(plan.num_new_tokens):
            out["attn_prefill"] = L * prefill
        out["emb"] = emb
        out["lm_head"], out["cpu_overhead"] = self._per_sequence(len(plan.num_new_tokens), T)
        if self.pp > 1:
            out["send_recv"] = sum(self.transfer_time(plan, s) for s in range(self.pp - 1))
        return out


def load_cost_model(path, *, model, device, tp: int = 1, pp: int = 1, placement=None,
                    engine=None) -> FittedCostModel:
    """The FittedCostModel of a ``servesim fit`` folder for ``model``/``device`` (ModelSpec/DeviceSpec or names);
    ``engine`` as for ``FittedCostModel``.

    Raises FitError when the folder is missing or malformed, or was fitted for other layer shapes or ``tp``.
    """
    return FittedCostModel(read_fitted(path), model, device, tp=tp, pp=pp, placement=placement, engine=engine)


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
