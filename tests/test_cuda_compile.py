"""Compile-check every CUDA source the package holds, without a GPU.

Convention: a module of `fade_asr` that carries CUDA C++ kernels exposes them as a module-level dict
`CUDA_SOURCES = {name: source}`. Each is compiled to PTX for sm_80 with `nvcc --ptx`; CI has nvcc but no GPU.
The checker itself is tested on a known-good and a known-broken kernel, so a silently passing
checker cannot hide a broken kernel.
"""
import importlib, os, pkgutil, shutil, subprocess, tempfile
from pathlib import Path

import pytest

import fade_asr

NVCC = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)


def cuda_sources():
    "Every `CUDA_SOURCES` entry of every fade_asr module, as (module.name, source) pairs."
    out = []
    for m in pkgutil.iter_modules(fade_asr.__path__):
        if m.name.startswith("_"): continue
        mod = importlib.import_module(f"fade_asr.{m.name}")
        for name, src in getattr(mod, "CUDA_SOURCES", {}).items(): out.append((f"{m.name}.{name}", src))
    return out


def nvcc_ptx(src: str, arch: str = "sm_80") -> subprocess.CompletedProcess:
    "Compile `src` to PTX with nvcc; returns the finished process (returncode, stderr)."
    with tempfile.TemporaryDirectory() as d:
        cu = Path(d) / "k.cu"
        cu.write_text(src)
        return subprocess.run([NVCC, "--ptx", f"-arch={arch}", "-o", str(Path(d) / "k.ptx"), str(cu)],
                              capture_output=True, text=True, timeout=300)


needs_nvcc = pytest.mark.skipif(NVCC is None and not os.environ.get("CI"), reason="nvcc not installed (CI has it)")

GOOD = 'extern "C" __global__ void axpy(float a, const float* x, float* y, int n)\n' \
       '{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] += a * x[i]; }\n'
BAD = GOOD.replace("y[i] += a * x[i];", "y[i] += a * undefined_symbol;")


@needs_nvcc
def test_checker_accepts_good_and_rejects_bad_kernel():
    assert NVCC is not None, "CI must have nvcc to compile-check kernels (CUDA toolkit 13)"
    assert nvcc_ptx(GOOD).returncode == 0
    bad = nvcc_ptx(BAD)
    assert bad.returncode != 0 and "undefined_symbol" in bad.stderr


@needs_nvcc
@pytest.mark.parametrize("name,src", cuda_sources() or [pytest.param(None, None, marks=pytest.mark.skip(reason="no CUDA sources in the package yet"))])
def test_package_kernel_compiles(name, src):
    r = nvcc_ptx(src)
    assert r.returncode == 0, f"CUDA source {name} does not compile:\n{r.stderr}"
