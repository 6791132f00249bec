"""One implicit-GEMM launch at a DCGAN layer shape, for Nsight Compute: what bounds our GEMMs
(the tile sweep leaves the forward GEMM 1.5-4x slower than cuDNN at the same shape).

    ncu --clock-control none -k regex:conv_gemm_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        python benches/gemm_sol.py --layer G3 --batch 512 --kind gemm

Runs the GEMM of benches/tune_gemm.py's case (the forward with the BN-statistics epilogue, the
data gradient, or the weight gradient; operands raw as the network feeds them by default, or with
--feed prologues through the producer's transforms) three times: the first compiles, the third
is the one to profile. Without ncu it prints the time of one launch.
"""
import argparse

import torch
import triton.testing

from layer_table import LAYERS
from tune_gemm import DTYPES, _case


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layer", default="G3", help="G1..G3, D1..D3")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--kind", default="gemm", choices=("gemm", "dgrad", "wgrad"))
    p.add_argument("--feed", default="raw", choices=("raw", "prologues"))
    a = p.parse_args()
    layer = next(lay for lay in LAYERS if lay[0].split()[0] == a.layer)
    _, runs, _, _, _ = _case(layer, a.batch, DTYPES[a.dtype], a.feed == "raw")
    for _ in range(3):
        runs[a.kind]()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(runs[a.kind], warmup=5, rep=20)
    print(f"{a.layer} B={a.batch} {a.dtype} {a.kind} ({a.feed}): {ms:.3f} ms")


if __name__ == "__main__":
    main()
