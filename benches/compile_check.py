"""Compile, without a GPU, every Triton kernel a full-size DCGAN training pass launches on an H100,
and report what each needs: shared memory (against the 227 KB a block may have), registers,
spills, and whether the main loop's loads became asynchronous copies (pipelined).

GPU time is scarce; this runs on any machine. It traces the triton backend's launches on CPU
tensors (G(z), D on real and fake images in one grouped pass, D on the fakes, forward and
backward, B=128/512, fp32 and bf16, with activations and dy fed through the GEMM prologues and
materialized)
with the kernels' launch replaced by a recorder, so the GPU tile choices (kernels/tiles.json and
the heuristics) are the ones traced, then compiles each distinct specialization for sm_90 with
the installed Triton's ptxas. Triton versions differ between machines (the GPU machine's may be
older), so a clean run here is a strong hint, not a proof.

    python benches/compile_check.py                 # B=128 and 512, fp32 and bf16
    python benches/compile_check.py --batches 128 --dtypes bf16 --verbose
    python benches/compile_check.py --batches 512 --dtypes bf16 --loops   # main-loop cost table
    python benches/compile_check.py --batches 128 --pdl   # the launches of FASTDCGAN_PDL=1
    python benches/compile_check.py --tma --loops   # FASTDCGAN_TMA=1: GEMM operands as TMA boxes

Exits 1 when a kernel fails to compile or needs more shared memory than a block may have (the
launcher would fall back to fewer stages); spills are reported, not failed (the tile sweep
measured some spilling forward tiles fastest). tests/test_compile_sm90.py runs it in CI.
"""
import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)   # trace the GPU configurations, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from gemm_traffic import mma_columns  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448   # bytes of shared memory per block on an H100
_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
          torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8"}


def _arg_type(v):
    if isinstance(v, torch.Tensor):
        return _TYPES[v.dtype]
    if isinstance(v, TensorDescriptor):
        return f"tensordesc<{_TYPES[v.base.dtype][1:]}[{','.join(map(str, v.block_shape))}]>"
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(v).__name__}")


class Recorder:
    """Replaces JITFunction.run: records (kernel, signature, constexprs, divisibility, warps,
    stages) of each launch instead of running it."""

    def __init__(self):
        self.launches = {}

    def run(self, fn, *args, grid, warmup, num_warps=4, num_stages=3, **kwargs):
        sig, consts, div16 = {}, {}, []
        params = fn.params
        for i, p in enumerate(params):
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                consts[p.name] = kwargs[p.name]
                continue
            v = args[i] if i < len(args) else kwargs[p.name]
            sig[p.name] = _arg_type(v)
            # what the JIT specializes on: 16-byte aligned pointers, integers divisible by 16
            if isinstance(v, torch.Tensor) or (isinstance(v, int) and not isinstance(v, bool)
                                               and v % 16 == 0 and not p.do_not_specialize):
                div16.append(i)
        key = (fn.fn.__name__, tuple(sig.items()), tuple(sorted(consts.items())), tuple(div16),
               num_warps, num_stages)
        self.launches.setdefault(key, (fn, sig, consts, div16, num_warps, num_stages))


def trace(batches, dtypes, pdl=False, tma=False):
    """Runs the traced passes with every kernel launch recorded instead of run (pdl: launched
    as FASTDCGAN_PDL=1 launches them on an H100; tma: with FASTDCGAN_TMA=1)."""
    from fastdcgan import Discriminator, Generator, ops
    from fastdcgan.kernels import implicit_gemm
    from fastdcgan.kernels import pdl as pdl_module

    rec = Recorder()
    implicit_gemm._num_sms = lambda device: 132   # an H100's
    ops._check_device = lambda device: None       # CPU tensors, never launched
    pdl_module.enabled = lambda device: pdl
    implicit_gemm.has_tma = lambda device: True   # an H100's
    original = JITFunction.run
    JITFunction.run = lambda self, *a, **k: rec.run(self, *a, **k)
    os.environ["FASTDCGAN_TMA"] = "1" if tma else "0"
    try:
        # every way of feeding the GEMMs: activations and dy through the consumers' prologues or
        # materialized (FASTDCGAN_MATERIALIZE_ACT / _DY)
        for dtype, batch, act, dy in itertools.product(dtypes, batches, "01", "01"):
            os.environ["FASTDCGAN_MATERIALIZE_ACT"] = act
            os.environ["FASTDCGAN_MATERIALIZE_DY"] = dy
            torch.manual_seed(0)
            G = Generator(backend="triton").to(dtype)
            D = Discriminator(backend="triton").to(dtype)
            z = torch.randn(batch, 100, 1, 1, dtype=dtype)
            real = torch.randn(batch, 3, 64, 64, dtype=dtype)
            fake = G(z)
            # the training step's D update (real and fake in one grouped pass), then its G update
            D.logits(torch.cat([real, fake.detach()]), groups=2).float().sum().backward()
            D.logits(fake).float().sum().backward()
            G.eval()
            with torch.no_grad():
                G(z)
    finally:
        JITFunction.run = original
        os.environ.pop("FASTDCGAN_MATERIALIZE_ACT", None)
        os.environ.pop("FASTDCGAN_MATERIALIZE_DY", None)
        os.environ.pop("FASTDCGAN_TMA", None)
    return rec.launches


# An H100 SM issues 4 warp-instructions per cycle and does ~4096 dense bf16 tensor FLOP per cycle
# (989 TFLOPS / 132 SMs / 1.83 GHz): a GEMM main loop needing more warp-instructions per FLOP
# than this is bound by instruction issue, not by its wgmmas, however it is tiled.
ISSUE_BUDGET = 4 / 4096


def _cuobjdump(cubin, *flags):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True).stdout


def _usage(cubin):
    m = re.search(r"REG:(\d+) STACK:(\d+)", _cuobjdump(cubin, "--dump-resource-usage"))
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def main_loop_sass(cubin):
    """SASS instructions in the kernel's main loop (a GEMM's K loop, or the weight gradient's
    pixel loop): the span between a backward branch and its target, the shortest one holding a
    tensor-core MMA (a TMA kernel's barrier-wait retries branch back into the loop from stubs at
    the kernel's end, spans that hold the loop's MMAs too), else the longest; without a loop (a
    GEMM of one K step), the whole kernel's."""
    ins = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", _cuobjdump(cubin, "-sass"))
    index = {int(a, 16): i for i, (a, _) in enumerate(ins)}
    spans = []
    for i, (a, text) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < int(a, 16) and int(m.group(1), 16) in index:
            spans.append((index[int(m.group(1), 16)], i))
    mma = [j - k + 1 for k, j in spans
           if any(re.search(r"\bHG?MMA\.", t) for _, t in ins[k:j + 1])]
    if mma:
        return min(mma)
    return max((j - k + 1 for k, j in spans), default=0) or len(ins)


def compile_one(fn, sig, consts, div16, num_warps, num_stages, loops=False):
    attrs = {(i,): [["tt.divisibility", 16]] for i in div16}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=TARGET,
                            options=dict(num_warps=num_warps, num_stages=num_stages,
                                         launch_pdl=bool(consts.get("PDL", False))))
    ttgir = kernel.asm["ttgir"]
    regs, stack = _usage(kernel.asm["cubin"])
    return dict(shared=kernel.metadata.shared, regs=regs, spill_bytes=stack,
                waits=kernel.asm["ptx"].count("griddepcontrol.wait"),
                async_copies=ttgir.count("async_copy_global_to_local"),
                wgmma="warp_group_dot" in ttgir,
                loop_sass=main_loop_sass(kernel.asm["cubin"]) if loops else None)


def _short(consts):
    keep = ("PRO", "OUT_MODE", "STATS", "EPI_GRAD", "GROUPED", "PHW", "T", "ALIGNED", "W_T",
            "DOT_PREC", "PAIR", "TMA", "BLOCK_M", "BLOCK_N", "BLOCK_K", "MODE", "TRAINING", "ACCUMULATE")
    return " ".join(f"{k}={v}" for k, v in consts.items() if k in keep)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="128,512")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--verbose", action="store_true", help="one line per kernel, not only problems")
    ap.add_argument("--pdl", action="store_true",
                    help="trace the launches of FASTDCGAN_PDL=1 (programmatic dependent launch)")
    ap.add_argument("--tma", action="store_true",
                    help="trace the launches of FASTDCGAN_TMA=1 and compile those with operands as "
                         "TMA boxes")
    ap.add_argument("--loops", action="store_true",
                    help="also table the GEMMs' main loops: SASS instructions per iteration and "
                         "warp-instructions per FLOP against the issue budget")
    a = ap.parse_args()
    dtypes = [{"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in a.dtypes.split(",")]
    launches = trace([int(b) for b in a.batches.split(",")], dtypes, a.pdl, a.tma)
    if a.tma:
        launches = {k: v for k, v in launches.items() if v[2].get("TMA")}
    print(f"{len(launches)} distinct kernel specializations traced; compiling for sm_90")
    errors = spilling = 0
    loops = []
    for fn, sig, consts, div16, warps, stages in launches.values():
        dtype = next(iter(sig.values())).lstrip("*")   # the first (operand) pointer's
        tag = f"{fn.fn.__name__} {dtype} w{warps} s{stages} {_short(consts)}"
        gemm = "BLOCK_M" in consts and "BLOCK_N" in consts and "BLOCK_K" in consts
        try:
            r = compile_one(fn, sig, consts, div16, warps, stages, loops=a.loops and gemm)
        except Exception as e:  # a compile error is what this tool is for
            errors += 1
            print(f"COMPILE ERROR {tag}: {str(e).splitlines()[0][:200]}")
            continue
        over = r["shared"] > SMEM_LIMIT   # launch would fall back to fewer stages
        # a kernel launched with PDL must wait for its predecessor (kernels/pdl.py)
        no_wait = consts.get("PDL", False) and not r["waits"]
        errors += over + no_wait
        spilling += bool(r["spill_bytes"])
        note = "; ".join(([f"SHARED {r['shared']} > {SMEM_LIMIT}"] if over else [])
                         + (["PDL LAUNCH WITHOUT griddepcontrol.wait"] if no_wait else [])
                         + ([f"spills {r['spill_bytes']} B/thread"] if r["spill_bytes"] else []))
        if note or a.verbose:
            print(f"{tag}: shared={r['shared']} regs={r['regs']} async_copies={r['async_copies']} "
                  f"wgmma={r['wgmma']} {note}")
        if r["loop_sass"]:
            # one iteration: a BLOCK_M x BLOCK_N x BLOCK_K slab of multiply-adds (the weight
            # gradient's tile is BLOCK_K x BLOCK_N, its step BLOCK_M pixels: the same product;
            # paired taps: two slabs)
            flop = 2 * consts["BLOCK_M"] * mma_columns(consts) * consts["BLOCK_K"]
            loops.append((r["loop_sass"] * warps / flop, r["loop_sass"], tag))
    print(f"{errors} kernel(s) failing to compile or over the shared memory, {spilling} spilling, "
          f"of {len(launches)}")
    if loops:
        print(f"\n| main loop | SASS / iteration | warp-instr. / FLOP (issue budget {ISSUE_BUDGET:.2e}) |")
        print("|---|---|---|")
        for per_flop, sass, tag in sorted(loops, reverse=True):
            print(f"| {tag} | {sass} | {per_flop:.2e} |")
    return 1 if errors else 0

if __name__ == "__main__":
    sys.exit(main())
