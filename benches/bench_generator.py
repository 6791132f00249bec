"""pytest-benchmark: Generator inference at B = 512 (eval, no grad), fp32 (TF32) and bf16:
fastdcgan's chained fused network vs eager PyTorch (channels_last) vs torch.compile, and both
models replayed from a CUDA graph (fastdcgan.sampler.CapturedGenerator).

    pytest benches/bench_generator.py --benchmark-only
"""
import pytest
import torch

from layer_table import generator_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("impl", ["ours", "ours (CUDA graph)", "eager", "eager + CUDA graph",
                                  "torch.compile"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_generator_inference(benchmark, dtype, impl):
    cases = generator_cases(512, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype],
                            compiled=impl == "torch.compile")
    fn = cases[impl]

    def run():
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()

    run()   # compile / warm up outside the timing
    benchmark.group = f"Generator inference B=512 {dtype}"
    benchmark.pedantic(run, warmup_rounds=3, rounds=30)
