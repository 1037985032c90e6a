"""A source checkout's folders must not shadow installed packages: transformers >= 5.25 imports the Hugging Face
`kernels` distribution, which `python -m edgepack` run from the checkout (whose root holds `kernels/`) and a bench
script named `kernels.py` both hid ("cannot import name 'CUDAProperties' from 'kernels'")."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# runs edgepack/__main__.py as `python -m edgepack` does, from the checkout, then reports what it left on the path
PROBE = """
import importlib.util, json, runpy, sys
sys.argv = ["edgepack", "--help"]
try:
    runpy.run_module("edgepack", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
spec = importlib.util.find_spec("kernels")
print(json.dumps({"path": sys.path, "kernels": spec and spec.origin}))
"""


def test_module_entry_point_drops_the_checkout_from_the_path():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(Path(p or ".").resolve() != ROOT for p in report["path"]), report["path"]
    # the checkout's kernels/ is reachable only as edgepack.kernels; a top-level `kernels` is someone else's or none
    assert report["kernels"] is None or not Path(report["kernels"]).resolve().is_relative_to(ROOT / "kernels")
    # and the installed subpackage still imports
    check = "import edgepack.kernels, edgepack.runtime; print(edgepack.kernels.__file__)"
    done = subprocess.run([sys.executable, "-c", check], cwd="/", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve().is_relative_to(ROOT / "kernels"), done.stdout


def test_bench_scripts_do_not_shadow_installed_packages():
    """`python bench/x.py` puts bench/ first on the path: no script may share a name with an installed package."""
    installed = set(importlib.metadata.packages_distributions())
    clashes = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.stem in installed)
    assert not clashes, f"rename {clashes}: they shadow installed packages of the same name"
    assert installed, "packages_distributions() found nothing: the check above could not fail"
