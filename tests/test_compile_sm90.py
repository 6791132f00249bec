"""Every Triton kernel of a full-size training pass compiles for the H100 (sm_90) and fits its
shared memory, checked on a machine without a GPU (benches/compile_check.py, in a subprocess:
the tests run the kernels in the interpreter, which replaces the compiled JIT functions)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_check(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benches", "compile_check.py"), *args],
                       capture_output=True, text=True, env=env, timeout=1200)
    out = r.stdout + r.stderr
    assert "distinct kernel specializations traced" in r.stdout, out[-3000:]
    assert r.returncode == 0, out[-3000:]


def test_training_kernels_compile_for_sm90():
    compile_check("--batches", "128")


def test_training_kernels_compile_for_sm90_with_pdl():
    """FASTDCGAN_PDL=1's specializations (bf16): each compiles with its griddepcontrol.wait."""
    compile_check("--batches", "128", "--dtypes", "bf16", "--pdl")


def test_tma_gemms_compile_for_sm90():
    """FASTDCGAN_TMA=1's GEMMs (operands as TMA boxes, bf16 and fp32) compile and fit."""
    compile_check("--batches", "128", "--tma")
