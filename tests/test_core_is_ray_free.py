import pkgutil
import subprocess
import sys

import rayalign


def test_importing_every_rayalign_module_never_imports_ray():
    modules = [m.name for m in pkgutil.iter_modules(rayalign.__path__, "rayalign.")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "assert 'ray' not in sys.modules, [k for k in sys.modules if k.startswith('ray.')][:5]\n")
    subprocess.run([sys.executable, "-c", code], check=True)
