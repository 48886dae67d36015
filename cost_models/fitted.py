"""Fitted per-operator cost models: regressors fitted to a profile, turned into lookup tables, saved with joblib,
and a ``CostModel`` that prices a ``BatchPlan`` with them.

Method (after Vidur, Agrawal et al., MLSys 2024, §5: one scikit-learn regressor per operator, fitted to profiled
medians and evaluated on the shapes a simulation reaches). Per operator, by its class:

===========  ====================================  =========================  ===================================
class        operators                             tree features (log1p)      work proxy terms (>= 0 weights)
===========  ====================================  =========================  ===================================
token        norms, QKV/O/up/down projections,     T (tokens), alignment of T 1, T
             RoPE, KV-cache save, act, add, emb
sequence     cpu_overhead                          B (sequences), alignment   1, B
head         lm_head                               B, T (tokens), alignment   1, B
prefill      attn_prefill (one chunk)              c, k, c x k                1, c, c x k, c^2, k
decode       attn_decode (the decode batch)        b, S (total KV), M (max)   1, b, S, b x M
collective   all_reduce, send_recv                 message bytes              1, bytes
===========  ====================================  =========================  ===================================

``ProxyTreeRegressor`` first fits the non-negative linear *work proxy* to the times by relative least squares
(the terms are the FLOP and byte counts of the roofline up to constants: Williams et al., CACM 2009), then an
ensemble of trees (extra trees or a random forest; a 3-fold cross-validated grid picks which) to ``log(time /
proxy)``, with leaves of one row: the ensemble averages noise over its 40 trees, while leaves of three rows
averaged neighbours across the steep small-batch end, where low-load decodes are priced (a quick CPU profile of the
tiny model: ``lm_head`` at B = 1, 2, 3 measured 2.69, 5.10, 8.08 ms and was fitted as 4.99, 5.64, 6.21 ms by the
leaf size the cross-validation picked; its random folds, mostly rows of the flat part, rewarded the smoothing).
Trees alone interpolate in steps and cannot extrapolate; the proxy carries the scale and the trees the residual
efficiency, which varies slowly — so held-out error stays small on a coarse grid, and past
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
``MODEL_DIR/tables-<profile hash>.npz`` (the lookup tables as numpy arrays, all a simulation needs: loading them
imports no scikit-learn) and ``MODEL_DIR/fitted-<profile hash>.joblib`` (the estimators);
``load_cost_model(MODEL_DIR, model=, device=, tp=, pp=)`` reads the tables.
Errors are ``FitError`` (a ValueError) naming the folder and the field.

This module is what simulating needs (no pandas, no scikit-learn); the fitting itself (the regressor, the tables'
grids, the cross-validation) is ``cost_models.fitting``, whose names are also reachable here for old pickles.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cost_models.lookup import IntTable, LogGrid
from cost_models.plan import BatchPlan

FIT_VERSION = 5           # 3: leaves of one row; 4: forests without bootstrap; 5: lm_head by (B, T) (earlier: refit)
MODEL_JSON = "model.json"
TOKEN_OPERATORS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_kv_cache_save", "attn_post_proj",
                   "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
OPERATOR_CLASS = {**{op: "token" for op in TOKEN_OPERATORS}, "emb": "token", "lm_head": "head",
                  "cpu_overhead": "sequence", "attn_prefill": "prefill", "attn_decode": "decode",
                  "all_reduce": "collective", "send_recv": "collective"}
CLASS_COLUMNS = {"token": ("num_tokens",), "sequence": ("batch_size",), "head": ("batch_size", "num_tokens"),
                 "prefill": ("chunk_size", "context_len"),
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
    return [1.0, x[0]]              # token: T; sequence: B; head: B (its tokens change the cache state only)


class Proxy:
    """``coef . proxy_terms(op_class, *x)``: an operator's non-negative linear work model (seconds)."""

    def __init__(self, op_class: str, coef):
        self.op_class = op_class
        self.coef = [float(c) for c in coef]

    def __call__(self, *x):
        return sum(c * t for c, t in zip(self.coef, proxy_terms(self.op_class, *x)) if c)


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
    ranges: dict = field(default_factory=dict)     # {op: {dimension: largest profiled value}} (``RANGE_DIMENSIONS``)

    @property
    def operators(self) -> list[str]:
        return sorted(self.tables)


#: the grid coordinates (``cost_models.fitting.grid_coords``) whose profiled maxima bound each class's shapes:
#: token operators by tokens T, per-sequence ones by sequences B (the LM head too: its price levels off past the
#: profiled T, where the layers before it have evicted all of its weights, and a profile made before it had a T
#: axis holds T = B only), prefill attention by chunk and context, decode attention by sequences b and mean KV
#: length S/b (the spread axis is left out: it is bounded by the batch).
RANGE_DIMENSIONS = {"token": ("tokens",), "sequence": ("sequences",), "head": ("sequences",),
                    "prefill": ("prefill_chunk", "prefill_context"),
                    "decode": ("decode_batch", "decode_kv_len"), "collective": ("message_bytes",)}


def profiled_ranges(op_class: str, coords) -> dict:
    """``{dimension: max}`` of one operator's profiled grid coordinates (``RANGE_DIMENSIONS``)."""
    return {dim: float(np.max(c)) for dim, c in zip(RANGE_DIMENSIONS[op_class], coords)}


class RangeTracker:
    """Counts the micro-batches a fitted model priced and those with a shape beyond its profile (extrapolated):
    per dimension, how many and how far (the largest value / the largest profiled one). A simulation attaches one
    to each fitted cost model it uses (``FittedCostModel.tracker``); replicas record each micro-batch they launch
    (``FittedCostModel.outside``) and each fast-forwarded step (``FittedCostModel.track_decodes``)."""

    def __init__(self):
        self.iterations = 0
        self.outside = 0
        self.by_dimension: dict = {}          # dim -> [iterations, max ratio]

    def add(self, ratios: dict, count: int = 1) -> None:
        """``count`` micro-batches priced; ``ratios`` ({dim: ratio > 1}) non-empty when they were outside."""
        self.iterations += count
        if ratios:
            self.outside += count
            for dim, r in ratios.items():
                entry = self.by_dimension.setdefault(dim, [0, 1.0])
                entry[0] += count
                entry[1] = max(entry[1], r)

    def report(self, limits: dict) -> dict:
        """``{iterations, extrapolated, share, by_dimension: {dim: {iterations, max_ratio, profiled_max}}}``."""
        return {"iterations": self.iterations, "extrapolated": self.outside,
                "share": self.outside / self.iterations if self.iterations else 0.0,
                "by_dimension": {d: {"iterations": n, "max_ratio": round(r, 4), "profiled_max": limits.get(d)}
                                 for d, (n, r) in sorted(self.by_dimension.items())}}


def describe_extrapolation(report: dict) -> str:
    """One line of a ``RangeTracker.report``: all inside the profile, or a WARNING with the share extrapolated and
    how far per dimension."""
    if not report["extrapolated"]:
        return f"fitted cost model: all {report['iterations']} micro-batches inside the profiled shapes"
    far = ", ".join(f"{dim} up to {v['max_ratio']:.2g}x the profiled {v['profiled_max']:g} ({v['iterations']})"
                    for dim, v in report["by_dimension"].items())
    return (f"WARNING: fitted cost model extrapolated {report['extrapolated']} of {report['iterations']} "
            f"micro-batches ({report['share']:.1%}) beyond the profiled shapes: {far}")


# --- save / load ------------------------------------------------------------------------------------------------

def _write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path`` (cost_models imports nothing of servesim, so no traces.tables)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_fitted(fitted: FittedProfile, out_dir: str | Path) -> Path:
    """Write into ``out_dir`` (created): ``tables-<hash12>.npz`` (the lookup tables as plain numpy arrays: what
    simulating needs, loaded without scikit-learn or pickles), ``fitted-<hash12>.joblib`` (the fitted estimators, to
    inspect or refit; needs scikit-learn) and ``model.json`` (the summary naming both). Each file goes through a
    temporary name and a rename, ``model.json`` last, so an interrupted save leaves the old set or the new one.
    Returns the tables' path."""
    import joblib
    import sklearn

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = fitted.profile_hash[:12]
    tables_name, estimators_name = f"tables-{key}.npz", f"fitted-{key}.joblib"
    arrays = {}
    for op, table in fitted.tables.items():
        arrays.update(table.to_arrays(f"{op}/"))

    def savez(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    _write_atomic(out / tables_name, savez)
    _write_atomic(out / estimators_name, lambda tmp: joblib.dump(fitted, tmp, compress=3))
    summary = {"file": estimators_name, "tables": tables_name, "profile_hash": fitted.profile_hash,
               "fit_version": FIT_VERSION, "sklearn_version": sklearn.__version__, "meta": fitted.meta,
               "cpu_overhead_s": fitted.cpu_overhead_s, "operators": fitted.operators, "notes": fitted.notes,
               "table_kinds": {op: {"kind": type(t).__name__, "op_class": OPERATOR_CLASS[op]}
                               for op, t in fitted.tables.items()},
               "heldout_error": [r.__dict__ for r in fitted.reports],
               "profiled_range": getattr(fitted, "ranges", {})}
    _write_atomic(out / MODEL_JSON, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2, default=str) + "\n"))
    return out / tables_name


def _read_summary(path: Path) -> dict:
    summary_path = path / MODEL_JSON
    if not summary_path.is_file():
        raise FitError(f"{path}: no {MODEL_JSON}; make the folder with `servesim fit PROFILE_DIR --out {path}`")
    try:
        summary = json.loads(summary_path.read_text())
        summary["file"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FitError(f"{summary_path}: malformed ({exc})") from None
    except OSError as exc:
        raise FitError(f"{summary_path}: cannot read: {exc.strerror or exc}") from None
    return summary


def read_fitted(path: str | Path, *, estimators: bool = False) -> FittedProfile:
    """Load the FittedProfile of a ``servesim fit`` folder: from its numpy tables (fast; no scikit-learn), or with
    ``estimators`` (or for a folder written before tables existed) from the joblib file. Raises FitError when it is
    missing or unreadable."""
    path = Path(path)
    summary = _read_summary(path)
    summary_path = path / MODEL_JSON
    tables_name = summary.get("tables")
    if tables_name and not estimators:
        file = path / tables_name
        if not file.is_file():
            raise FitError(f"{summary_path}: field tables: {tables_name} not found beside it")
        try:
            arrays = dict(np.load(file, allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise FitError(f"{file}: unreadable tables ({exc})") from None
        tables = {}
        for op, info in summary.get("table_kinds", {}).items():
            cls = IntTable if info["kind"] == "IntTable" else LogGrid
            tables[op] = cls.from_arrays(arrays, f"{op}/", lambda coef, c=info["op_class"]: Proxy(c, coef))
        reports = [OperatorReport(**r) for r in summary.get("heldout_error", [])]
        return FittedProfile(summary["profile_hash"], summary.get("meta", {}), tables, {}, reports,
                             summary.get("cpu_overhead_s"), summary.get("notes", []),
                             summary.get("profiled_range") or {})
    import joblib

    file = path / summary["file"]
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
        self.limits = self._limits(getattr(fitted, "ranges", None) or {})
        self.tracker: RangeTracker | None = None
        self._token_cache: dict[int, tuple] = {}
        self._prefill_cache: dict[tuple, float] = {}
        self._seq_cache: dict[int, float | None] = {}
        self._head_cache: dict[tuple, float] = {}
        head = tables.get("lm_head")
        # a folder fitted before the LM head had a token axis holds a table of B alone
        self._head_by_tokens = head is not None and not isinstance(head, IntTable)
        self._act_bytes = self.model.hidden_size * self.model.dtype_bytes

    # --- the profiled range -----------------------------------------------------------------------------------
    def _limits(self, ranges: dict) -> dict:
        """The largest profiled value per dimension over the tables this model prices with (the tightest of the
        operators sharing a dimension); empty for a folder fitted before ranges were recorded."""
        limits: dict = {}
        for op in self.tables:
            for dim, value in (ranges.get(op) or {}).items():
                if OPERATOR_CLASS.get(op) != "collective":
                    limits[dim] = min(limits.get(dim, value), value)
        return limits

    def outside(self, plan) -> dict:
        """``{dimension: value / largest profiled value}`` for each dimension in which ``plan`` lies beyond the
        profile (empty when inside, or when the folder records no ranges): tokens, sequences, each prefill chunk
        and its context, the decode batch and its mean KV length (context + 1 per sequence)."""
        d = plan.num_decodes
        return self.outside_counts(d, sum(plan.context_lens[:d]), plan.num_new_tokens[d:], plan.context_lens[d:])

    def outside_counts(self, d: int, ctx_sum: int, chunks, chunk_ctxs) -> dict:
        """``outside`` of a micro-batch of ``d`` decodes whose contexts sum to ``ctx_sum`` and prefill chunks of
        ``chunks[k]`` tokens after ``chunk_ctxs[k]`` cached ones (no plan needed)."""
        lim = self.limits
        if not lim:
            return {}
        out = {}

        def check(dim, value):
            m = lim.get(dim)
            if m and value > m and value / m > out.get(dim, 1.0):
                out[dim] = value / m
        check("tokens", d + sum(chunks))
        check("sequences", d + len(chunks))
        if d:
            check("decode_batch", d)
            check("decode_kv_len", (ctx_sum + d) / d)
        for c, k in zip(chunks, chunk_ctxs):
            check("prefill_chunk", c)
            check("prefill_context", k)
        return out

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
        """(lm_head, cpu_overhead) seconds of an iteration of ``T`` tokens over ``B`` sequences (cached per (B, T)
        and B; the engine profile's per-token part, when it has one, added per call)."""
        lm = self._head_cache.get((B, T))
        if lm is None:
            table = self.tables.get("lm_head")
            if table is None:
                lm = self.roofline._last_stage_ops(B)["lm_head"]
            else:
                lm = table(B, T) if self._head_by_tokens else table(B)
            if len(self._head_cache) < 65536:
                self._head_cache[(B, T)] = lm
        if B in self._seq_cache:
            cpu = self._seq_cache[B]
        else:
            if self.cpu_overhead_s is not None:
                cpu = self.cpu_overhead_s
            elif "cpu_overhead" in self.tables:
                cpu = self.tables["cpu_overhead"](B)
            else:
                cpu = None                  # the engine profile's (roofline.engine_overhead), below
            if len(self._seq_cache) < 65536:
                self._seq_cache[B] = cpu
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

    def step_time(self, d: int, ctx_sum: int, ctx_max: int, chunk: int = 0, chunk_ctx: int = 0) -> float:
        """``iteration_time`` (``pp`` = 1), bit for bit, of a micro-batch of ``d`` decodes (0 allowed with a chunk)
        whose context lengths sum to ``ctx_sum``, the longest ``ctx_max``, plus, when ``chunk`` > 0, one prefill
        chunk of ``chunk`` tokens after ``chunk_ctx`` cached ones (scalar table lookups; no plan is built)."""
        if self.pp != 1:
            raise ValueError("step_time prices one stage (pp = 1)")
        T = d + chunk
        _, layer_total, emb = self._token_ops(T)
        decode = self._decode_s(d, ctx_sum, ctx_max)
        if not chunk:
            lm, cpu = self._per_sequence(d, d)
            return self.stage_layers[0] * (layer_total + decode + 0.0) + emb + lm + cpu
        _, prefill = self._attention(BatchPlan.prefill(chunk, chunk_ctx))
        lm, cpu = self._per_sequence(d + 1, T)
        return self.stage_layers[0] * (layer_total + decode + prefill) + emb + lm + cpu

    def chunks_step_time(self, d: int, ctx_sum: int, ctx_max: int, chunks: tuple, chunk_ctxs: tuple) -> float:
        """``step_time`` with several prefill chunks (``chunks[k]`` tokens after ``chunk_ctxs[k]`` cached ones, in
        plan order), bit for bit ``iteration_time`` of that plan."""
        if self.pp != 1:
            raise ValueError("step_time prices one stage (pp = 1)")
        T = d + sum(chunks)
        _, layer_total, emb = self._token_ops(T)
        decode = self._decode_s(d, ctx_sum, ctx_max)
        _, prefill = self._attention(BatchPlan(tuple(range(len(chunks))), tuple(chunks), tuple(chunk_ctxs), 0))
        lm, cpu = self._per_sequence(d + len(chunks), T)
        return self.stage_layers[0] * (layer_total + decode + prefill) + emb + lm + cpu

    def _decode_s(self, d: int, ctx_sum: int, ctx_max: int) -> float:
        """Per-layer seconds of the decode attention of ``d`` sequences (contexts summing to ``ctx_sum``, the
        longest ``ctx_max``), as ``_attention`` prices them; 0.0 without decodes."""
        if not d:
            return 0.0
        total = ctx_sum + d
        table = self.tables.get("attn_decode")
        if table is not None:
            return table(d, total / d, d * (ctx_max + 1) / total)
        # the roofline's decode attention reads only the total context
        return self.roofline._attention(BatchPlan.decodes([ctx_sum] + [0] * (d - 1)))["attn_decode"]

    def track_decodes(self, batch, ctx_sums) -> None:
        """Record in the tracker decode-only steps of ``batch[j]`` sequences with ``ctx_sums[j]`` context (a
        fast-forwarded stretch, counted as its steps one by one would be)."""
        batch, ctx_sums = np.asarray(batch, dtype=float), np.asarray(ctx_sums, dtype=float)
        lim = self.limits
        values = {"tokens": batch, "sequences": batch, "decode_batch": batch,
                  "decode_kv_len": (ctx_sums + batch) / batch}
        ratios = {dim: values[dim] / lim[dim] for dim in values if lim.get(dim)}
        beyond = np.zeros(len(batch), dtype=bool)
        for r in ratios.values():
            beyond |= r > 1
        inside = int(len(batch) - beyond.sum())
        if inside:
            self.tracker.add({}, inside)
        for j in np.flatnonzero(beyond).tolist():
            self.tracker.add({dim: float(r[j]) for dim, r in ratios.items() if r[j] > 1})

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


_FITTING_NAMES = {"grid_coords", "tree_features", "fit_proxy", "ProxyTreeRegressor", "median_ape", "TableBounds",
                  "build_table", "table_predict", "profile_hash", "fit_operator", "aggregate_rows", "fit_profile",
                  "format_report"}


def __getattr__(name):
    """The fitting code moved to ``cost_models.fitting``; forward its names (joblib files saved before the move
    pickle ``cost_models.fitted.ProxyTreeRegressor``)."""
    if name in _FITTING_NAMES:
        from cost_models import fitting

        return getattr(fitting, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
