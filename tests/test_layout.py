"""The package layout stays a layered graph: traces and cost_models import nothing of servesim, the profiler only
those two, the simulator anything below it — so no import cycle between packages, and a simulation never needs the
profiler's torch or the fitting code's scikit-learn."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("simulator", "cost_models", "profiler", "traces")
ALLOWED = {"traces": set(), "cost_models": set(), "profiler": {"cost_models", "traces"},
           "simulator": {"cost_models", "profiler", "traces"}}


def imported_packages(path: Path) -> dict[str, int]:
    """servesim packages a module imports anywhere (module level or inside functions) -> first line."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in PACKAGES:
                found.setdefault(top, node.lineno)
    return found


def test_packages_import_only_the_layers_below_them():
    bad = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for other, line in imported_packages(path).items():
                if other != package and other not in ALLOWED[package]:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {other}")
    assert not bad, "layering broken (see tests/test_layout.py):\n" + "\n".join(bad)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import numpy\n\ndef f():\n    from simulator.config import SimConfig\n    import traces.prefix\n")
    assert imported_packages(module) == {"simulator": 4, "traces": 5}


@pytest.mark.parametrize("module, forbidden", [
    ("simulator", ("torch", "sklearn", "profiler")),
    ("cost_models.fitted", ("torch", "sklearn", "pandas")),
    ("cost_models.roofline", ("torch", "sklearn", "pandas")),
    ("simulator.simulation", ("torch", "sklearn", "profiler", "pandas")),
    ("simulator.cli", ("pandas", "pyarrow")),
    ("traces", ("pandas", "pyarrow")),
])
def test_simulating_imports_neither_torch_nor_the_fitting_code(module, forbidden):
    code = (f"import sys, {module}\n"
            f"print(','.join(m for m in {forbidden!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"importing {module} loaded {out.stdout.strip()}"


def test_simulating_a_builtin_workload_never_imports_pandas(tmp_path):
    """``load_columns`` generates sharegpt without pandas and the tables are written through pyarrow's buffers
    (``simulator.output``), so a default run never pays pandas' import (about half a second)."""
    code = ("import sys\nfrom simulator.cli import main\n"
            f"try:\n    main(['simulate', '--num-requests', '20', '--out', {str(tmp_path / 'out')!r}])\n"
            "except SystemExit:\n    pass\n"
            "print('loaded:', ','.join(m for m in ('pandas',) if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert (tmp_path / "out" / "requests.csv").exists(), out.stdout + out.stderr
    last = out.stdout.splitlines()[-1]
    assert last == "loaded: ", f"simulate {last}"
