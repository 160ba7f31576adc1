"""Which libkvpager.so.1 the package loads: $KVPAGER_LIB, else the one next to the package."""

import os
import shutil
import subprocess
import sys

import kvpager
from conftest import PYTHON_DIR

PRINT_PATH = "import kvpager; print(kvpager.library_path())"


def python(code, cwd, **env_changes):
    env = dict(os.environ, **env_changes)
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def test_kvpager_lib_names_the_library_loaded():
    assert kvpager.library_path() == os.environ["KVPAGER_LIB"]


def test_a_kvpager_lib_that_does_not_load_is_an_error_naming_it(tmp_path):
    missing = str(tmp_path / "nowhere" / "libkvpager.so.1")
    done = python(PRINT_PATH, PYTHON_DIR, KVPAGER_LIB=missing)
    assert done.returncode != 0
    assert f"KVPAGER_LIB={missing} does not load" in done.stderr


def test_without_kvpager_lib_the_copy_next_to_the_package_loads(tmp_path):
    shutil.copytree(os.path.join(PYTHON_DIR, "kvpager"), tmp_path / "kvpager",
                    ignore=shutil.ignore_patterns("__pycache__"))
    beside = tmp_path / "kvpager" / "libkvpager.so.1"
    os.symlink(os.environ["KVPAGER_LIB"], beside)
    done = python(PRINT_PATH + "; print(kvpager.Codec('fp16', 8).nbytes(2))", tmp_path, KVPAGER_LIB=None,
                  PYTHONPATH=None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(beside), "32"]


def test_importing_needs_no_library(tmp_path):
    shutil.copytree(os.path.join(PYTHON_DIR, "kvpager"), tmp_path / "kvpager",
                    ignore=shutil.ignore_patterns("__pycache__"))
    done = python("import kvpager; print(kvpager.Shape(1, 1, 1, 8).head_dim)", tmp_path, KVPAGER_LIB=None,
                  PYTHONPATH=None, LD_LIBRARY_PATH=None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "8"
