"""tools/show_metadata.py: JSON to stdout, one-line errors, fast --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "show_metadata.py")


def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=60)


def test_prints_metadata_as_json(tmp_path):
    md = {"ss_network_dim": "4", "modelspec.title": "タイトル", "ss_tag_frequency": json.dumps({"d": {"cat": 2}})}
    path = tmp_path / "lora.safetensors"
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(path), metadata=md)
    r = _run("--model", str(path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == md
    assert "\n    " in r.stdout  # pretty-printed


def test_no_metadata_prints_empty_object(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(path))
    r = _run("--model", str(path))
    assert r.returncode == 0 and json.loads(r.stdout) == {}


def test_errors_are_one_line(tmp_path):
    missing = tmp_path / "missing.safetensors"
    r = _run("--model", str(missing))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and str(missing) in r.stderr and "Traceback" not in r.stderr

    bogus = tmp_path / "model.ckpt"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    r = _run("--model", str(bogus))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(bogus) in r.stderr

    r = _run("--model", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(tmp_path) in r.stderr


def test_help_is_fast_and_light():
    t0 = time.time()
    r = _run("--help")
    assert r.returncode == 0 and "--model" in r.stdout
    assert time.time() - t0 < 5
    code = (
        "import runpy, sys; sys.argv=['x', '--help']\n"
        "try:\n    runpy.run_path(%r, run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'safetensors' not in sys.modules, sorted(sys.modules)\n" % SCRIPT
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
