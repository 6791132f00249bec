"""pytest-benchmark: one whole DCGAN training step, fastdcgan (fused kernels, CUDA graph) vs the
peers of benches/peers.py, B = 128 and 512, all in this process on this GPU.

    pytest benches/bench_step.py --benchmark-only
The readable table with ratios: python benches/step_table.py
"""
import pytest
import torch

from peers import PEERS, ours_step, peer_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = ["ours fp32", "ours bf16", *PEERS]


@pytest.mark.parametrize("batch", [128, 512])
@pytest.mark.parametrize("case", CASES)
def test_train_step(benchmark, case, batch):
    if case.startswith("ours"):
        step = ours_step(batch, case.split()[1])
    else:
        step = peer_step(case, batch)

    def run():
        step()
        torch.cuda.synchronize()

    for _ in range(5):   # compile, capture, warm up outside the timing
        run()
    benchmark.group = f"train step B={batch}"
    benchmark.extra_info["images_per_step"] = batch
    benchmark.pedantic(run, warmup_rounds=3, rounds=30)
