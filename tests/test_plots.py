"""Figures: what each plots (line data), files written (PNG + SVG, deterministic), inputs from runs and sweeps."""
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from simulator.cli import main
from simulator.config import SimConfig
from simulator.metrics import tbt_gaps
from simulator.plots import (PlotError, capacity_figure, cdf_figure, latency_figure, load_run, plot_paths, save,
                             timeline_figure)
from simulator.simulation import simulate
from simulator.slo import token_times_table

TINY = SimConfig(model="tiny", device="cpu", max_model_len=8192, allow_long_max_model_len=True, num_requests=40,
                 qps=2.0)


def _capacity_table():
    return pd.DataFrame({
        "point_key": list("abcd"),
        "trace": ["sharegpt"] * 4,
        "scheduler": ["vllm", "orca", "sarathi", "sarathi"],
        "token_budget": [np.nan, np.nan, 512, 2048],
        "capacity_qps": [1.0, 0.9, 2.6, 1.8],
        "slo_description": ["P99 TBT <= 0.1 s"] * 4,
    })


def test_capacity_figure_draws_budget_points_and_flat_baselines():
    fig = capacity_figure(_capacity_table().assign(model="Mistral-7B", device="A100-80GB-SXM"))
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    sarathi = lines["sarathi (per token budget)"]
    assert list(sarathi.get_xdata()) == [512, 2048] and list(sarathi.get_ydata()) == [2.6, 1.8]
    assert sarathi.get_linestyle() == "None" and sarathi.get_marker() == "o"      # points: budgets are discrete
    assert list(lines["vllm (no budget)"].get_ydata()) == [1.0, 1.0]
    assert list(lines["orca (no budget)"].get_ydata()) == [0.9, 0.9]
    title = fig.get_suptitle()
    assert ax.get_ylabel() == "capacity (QPS)" and "P99 TBT" in title
    assert "Mistral-7B on A100-80GB-SXM (tp=1, pp=1)" in title


def test_capacity_figure_has_one_panel_per_other_varying_key():
    two = pd.concat([_capacity_table(), _capacity_table().assign(trace="arxiv", capacity_qps=[0.5, 0.4, 1.0, 0.8])])
    fig = capacity_figure(two)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["sharegpt", "arxiv"]


def test_latency_figure_plots_p99_tbt_and_median_ttft_against_qps():
    table = pd.DataFrame({"point_key": list("abcd"), "scheduler": ["vllm", "vllm", "sarathi", "sarathi"],
                          "qps": [2.0, 1.0, 1.0, 2.0], "tbt_s_p99": [0.3, 0.1, 0.05, 0.06],
                          "ttft_s_p50": [0.4, 0.2, 0.3, 0.5]})
    fig = latency_figure(table)
    tbt_ax, ttft_ax = fig.axes[:2]
    vllm = next(line for line in tbt_ax.get_lines() if line.get_label() == "vllm")
    assert list(vllm.get_xdata()) == [1.0, 2.0] and list(vllm.get_ydata()) == [0.1, 0.3]
    sarathi = next(line for line in ttft_ax.get_lines() if line.get_label() == "sarathi")
    assert list(sarathi.get_ydata()) == [0.3, 0.5]
    with pytest.raises(PlotError, match="qps-mode sweep table"):
        latency_figure(_capacity_table())


def test_save_writes_png_and_identical_svg(tmp_path):
    paths = save(capacity_figure(_capacity_table()), tmp_path, "cap")
    assert [p.name for p in paths] == ["cap.png", "cap.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = paths[1].read_bytes()
    save(capacity_figure(_capacity_table()), tmp_path, "cap")
    assert paths[1].read_bytes() == first


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    result = simulate(TINY)
    out = result.write(tmp_path_factory.mktemp("run") / "sarathi")
    return out, result


def test_tbt_gaps_from_tokens_csv_or_replay_agree(run_dir, tmp_path):
    out, result = run_dir
    requests, replayed, iterations, _ = load_run(out)                 # no tokens.csv: replays summary.json
    np.testing.assert_array_equal(np.sort(replayed), np.sort(tbt_gaps(result.requests)))
    token_times_table(result.requests).to_csv(out / "tokens.csv", index=False)
    _, from_file, _, _ = load_run(out)
    np.testing.assert_allclose(np.sort(from_file), np.sort(replayed), rtol=0, atol=1e-9)
    (out / "tokens.csv").unlink()
    assert len(requests) == 40 and len(iterations) == result.summary["num_iterations"]


def test_cdf_figure_is_a_cdf_per_metric(run_dir):
    out, result = run_dir
    requests, gaps, _, _ = load_run(out)
    fig = cdf_figure({"a": (requests, gaps)})
    ttft, tbt, delay = fig.axes[:3]
    y = tbt.get_lines()[0].get_ydata()
    assert len(y) == len(gaps) and y[-1] == 1.0 and np.all(np.diff(y) > 0)
    assert ttft.get_lines()[0].get_xdata()[-1] == requests["ttft_s"].max()
    assert delay.get_xlabel() == "scheduling delay (s)"


def test_timeline_window_and_stacking(run_dir):
    _, result = run_dir
    it = result.iterations
    fig = timeline_figure(it, window_s=(0.0, 5.0))
    collections = fig.axes[0].collections                         # decode area, then prefill stacked on top
    assert [c.get_label() for c in collections] == ["decode tokens", "prefill tokens"]
    with pytest.raises(PlotError, match="no iterations in the window"):
        timeline_figure(it, window_s=(1e9, 1e9 + 1))


def test_plot_cli_on_run_and_sweep(run_dir, tmp_path):
    out, _ = run_dir
    _capacity_table().to_csv(tmp_path / "sweep.csv", index=False)
    res = CliRunner().invoke(main, ["plot", str(out), str(tmp_path / "sweep.csv"), "--out", str(tmp_path / "figs")])
    assert res.exit_code == 0, res.output
    from simulator.plots import run_label
    import json
    summary = json.loads((out / "summary.json").read_text())
    assert run_label(summary).startswith("sarathi 512 @ ")                   # legends name the run, not its folder
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["capacity_vs_token_budget.png", "capacity_vs_token_budget.svg", "cdfs.png", "cdfs.svg",
                     "timeline_sarathi.png", "timeline_sarathi.svg"]
    bad = CliRunner().invoke(main, ["plot", str(tmp_path / "nowhere"), "--out", str(tmp_path / "figs")])
    assert bad.exit_code == 2 and "nowhere: no such file or folder" in bad.output
