"""``servesim profile`` and ``servesim fit`` (registered in ``simulator/cli.py``).

    servesim profile --model tiny --exec-device cpu --quick --out runs/profile-tiny
    servesim fit runs/profile-tiny --out runs/model-tiny
    servesim simulate --model tiny --device cpu --cost-model runs/model-tiny --max-model-len 8192

    servesim fit --from-vidur ../shared/data/profiles/vidur --model Llama-3-8B --out runs/model-l3
    servesim simulate --model Llama-3-8B --device A100-80GB-PCIe --cost-model runs/model-l3

No torch at import time: ``profile`` imports it inside the command, ``fit`` never needs it.
"""
from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

import click


def user_errors(func):
    """``simulator.cli.user_errors`` (bad input -> one-line ``error: ...``, exit 2), looked up when the command
    runs, so that importing this module first does not import ``simulator.cli`` mid-way (it imports us)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from simulator.cli_options import user_errors as wrap
        return wrap(func)(*args, **kwargs)
    return wrapper


@click.command("profile")
@click.option("--model", required=True, help="Model name (e.g. tiny, Mistral-7B), YAML spec or HF config.json.")
@click.option("--exec-device", type=click.Choice(["cuda", "cpu"]), default=None,
              show_default="cuda when available, else cpu",
              help="Torch device that runs the kernels; the device spec is recorded from the hardware found "
                   "(servesim fit --device overrides it).")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tensor-parallel degree (weights sharded on this one device).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), show_default="the model spec's",
              help="Data type.")
@click.option("--quick", is_flag=True, help="Small grid and short timing (CPU, CI).")
@click.option("--threads", type=click.IntRange(min=1), show_default="1",
              help="CPU threads (1: steadier timings on shared machines).")
@click.option("--max-tokens", type=click.IntRange(min=1), show_default="--max-context; 1024 with --quick",
              help="Largest token count of the linear operators.")
@click.option("--max-context", type=click.IntRange(min=1),
              show_default="the model's, at most 4096 with --quick, else 8192",
              help="Largest context of the attention shapes.")
@click.option("--operators", show_default="all", help="Comma-separated subset of operators.")
@click.option("--cold-cache/--warm-cache", default=True, show_default=True,
              help="Cycle weights and KV through twice the last-level cache between calls (as in an iteration).")
@click.option("--collectives/--no-collectives", default=None,
              help="Also time all-reduce/send-recv across --tp workers (default: on CUDA with >= tp GPUs).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for profile.csv and meta.json (an interrupted run resumes there).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@user_errors
def profile(model, exec_device, tp, dtype, quick, threads, max_tokens, max_context, operators, cold_cache, collectives,
            out, progress):
    """Time one decoder layer's operators over a shape grid into OUT/profile.csv + meta.json."""
    from cost_models.specs import load_model
    from profiler.schema import OPERATORS, ProfileError

    try:
        from profiler.run import run_profile
        import torch
    except ImportError:
        raise ProfileError("profiling needs torch: pip install -e '.[profile]'") from None
    spec = load_model(model)
    ops = [o.strip() for o in operators.split(",") if o.strip()] if operators else None
    if operators and not ops:
        raise ProfileError(f"--operators: no operator in {operators!r}; known: {', '.join(OPERATORS)}")
    if ops:
        unknown = [o for o in ops if o not in OPERATORS]
        if unknown:
            raise ProfileError(f"--operators: unknown {', '.join(unknown)}; known: {', '.join(OPERATORS)}")
    if progress is None:
        progress = sys.stderr.isatty()
    device = exec_device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    path = run_profile(spec, device=device, tp=tp, dtype=dtype, quick=quick, out_dir=out, num_threads=threads,
                       operators=ops, max_context=max_context, max_tokens=max_tokens, collectives=collectives,
                       cold_cache=cold_cache, progress=progress, echo=lambda text: click.echo(text, err=True))
    meta = json.loads((Path(out) / "meta.json").read_text())
    click.echo(f"profiled {spec.name} (tp={tp}, {meta['dtype']}) on {meta['device_name']}: {meta['num_rows']} rows "
               f"in {time.perf_counter() - start:.1f} s")
    click.echo(f"wrote {path} and {Path(out) / 'meta.json'}")


@click.command("fit")
@click.argument("profile_dir", required=False, type=click.Path(file_okay=False))
@click.option("--from-vidur", "vidur_dir", type=click.Path(file_okay=False), show_default="none",
              help="Import Vidur-format tables (mlp.csv, attention.csv, ...) found under this folder.")
@click.option("--model", show_default="the profile's model", help="Model of the Vidur tables.")
@click.option("--tp", type=click.IntRange(min=1), show_default="the profile's, else 1",
              help="Tensor-parallel degree of the Vidur rows.")
@click.option("--device", show_default="the profile's; A100-80GB-PCIe for Vidur tables, where Vidur measured them; "
                                       "cpu for CPU profiles",
              help="Device spec the tables were measured on.")
@click.option("--cpu-overhead-ms", type=click.FloatRange(min=0),
              show_default="the profile's or Vidur's cpu_overhead by batch size, else the roofline's constant",
              help="Per-iteration CPU overhead, replacing the profiled cpu_overhead operator.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the held-out split and the trees.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the fitted model.")
@click.option("--force", is_flag=True, help="Refit even if OUT holds a model of the same profile.")
@user_errors
def fit(profile_dir, vidur_dir, model, tp, device, cpu_overhead_ms, seed, out, force):
    """Fit per-operator cost models to PROFILE_DIR (servesim profile) and/or Vidur tables; print held-out error."""
    import pandas as pd

    from cost_models.fitted import FIT_VERSION, FitError, load_cost_model, read_fitted, save_fitted
    from cost_models.fitting import TableBounds, fit_profile, format_report, profile_hash
    from cost_models.specs import ModelSpec, load_device, load_model
    from profiler.schema import read_meta, read_profile

    from traces.tables import ensure_dir

    if not profile_dir and not vidur_dir:
        raise FitError("give a profile folder (servesim profile --out DIR) or --from-vidur DIR")
    if cpu_overhead_ms is not None and not math.isfinite(cpu_overhead_ms):
        raise FitError(f"--cpu-overhead-ms: must be a finite number >= 0, got {cpu_overhead_ms}")
    ensure_dir(out, error=FitError)             # an unwritable --out fails now, not after the fit
    frames, meta, spec = [], {}, None
    if profile_dir:
        frames.append(read_profile(profile_dir))
        meta = read_meta(profile_dir)
        meta.setdefault("source", "servesim profile")
        if not meta.get("model_shape") or not meta.get("model_spec"):
            raise FitError(f"{profile_dir}: meta.json lacks model_shape/model_spec; re-run servesim profile")
        spec = ModelSpec(**{k: v for k, v in meta["model_spec"].items() if k in ModelSpec.__dataclass_fields__})
        if model and load_model(model).name != spec.name:
            raise FitError(f"--model {model}: {profile_dir} profiles {spec.name}")
    if vidur_dir:
        from profiler.vidur import read_vidur_profile
        spec = load_model(model) if model else spec
        if spec is None:
            raise FitError("--from-vidur needs --model (the model whose shapes to import)")
        vidur_tp = tp or int(meta.get("tp", 1))
        vdf, vmeta = read_vidur_profile(vidur_dir, spec, tp=vidur_tp, device=device or "A100-80GB-PCIe")
        if frames:
            own = set(frames[0]["operator"])
            dropped = sorted(set(vdf["operator"]) & own)
            vdf = vdf[~vdf["operator"].isin(own)]
            vmeta["notes"].append(f"operators from {profile_dir} replace Vidur's: {', '.join(dropped) or 'none'}")
            meta = {**vmeta, **meta, "notes": vmeta["notes"], "vidur_files": vmeta["vidur_files"]}
        else:
            meta = vmeta
        frames.append(vdf)
    df = pd.concat(frames, ignore_index=True)
    meta["device_spec"] = load_device(device).name if device else meta.get("device_spec") or \
        _guess_device_spec(meta.get("device"), meta.get("device_name", ""))
    cpu_overhead_s = cpu_overhead_ms / 1e3 if cpu_overhead_ms is not None else None

    bounds = TableBounds()
    settings = {"seed": seed, "version": FIT_VERSION, "bounds": bounds.__dict__, "cpu_overhead_s": cpu_overhead_s}
    key = profile_hash(df, settings)
    fitted = None
    if not force and (Path(out) / "model.json").is_file():
        try:
            previous = read_fitted(out)
            if previous.profile_hash == key:
                fitted = previous
                click.echo(f"{out} already holds the model of this profile (hash {key[:12]}); --force refits")
        except FitError:
            pass
    start = time.perf_counter()
    if fitted is None:
        fitted = fit_profile(df, meta, seed=seed, cpu_overhead_s=cpu_overhead_s, bounds=bounds)
        path = save_fitted(fitted, out)
        click.echo(f"fitted {len(fitted.tables)} operators of {meta.get('model')} ({len(df)} rows) in "
                   f"{time.perf_counter() - start:.1f} s; held-out error per operator:")
    else:
        path = Path(out) / json.loads((Path(out) / "model.json").read_text())["file"]
    click.echo(format_report(fitted))
    for note in list(meta.get("notes", [])) + fitted.notes:
        click.echo(f"note: {note}")
    cm = load_cost_model(out, model=spec, device=meta["device_spec"] or "A100-80GB-SXM", tp=int(meta.get("tp", 1)))
    if cm.fallbacks:
        click.echo(f"priced by the roofline (not in the profile): {', '.join(cm.fallbacks)}")
    click.echo(f"wrote {path} and {Path(out) / 'model.json'}")


def _guess_device_spec(device: str | None, device_name: str) -> str | None:
    """The built-in device spec a profiled device most likely is (None when unknown; pass --device then)."""
    if device == "cpu":
        return "cpu"
    name = device_name.upper()
    for marker, spec in (("A100", "A100-80GB-PCIe" if "PCIE" in name else "A100-80GB-SXM"), ("H100", "H100-SXM"),
                         ("H200", "H200"), ("A40", "A40")):
        if marker in name:
            return spec
    return None
