"""pytest-benchmark: each fused DCGAN layer op vs its eager PyTorch sequence (cuDNN conv +
BatchNorm2d + activation, same dtype, channels_last), forward and forward+backward, fp32/bf16,
B = 128 and 512. The cases are the ones of layer_table.py (which prints them as one table).

    pytest benches/bench_layers.py --benchmark-only [-k "G1 and bf16"]
"""
import pytest
import torch

from layer_table import LAYERS, layer_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("impl", ["ours", "eager"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("batch", [128, 512])
@pytest.mark.parametrize("layer", LAYERS, ids=[layer[0].replace(" ", "_") for layer in LAYERS])
def test_layer(benchmark, layer, batch, dtype, mode, impl):
    torch.backends.cudnn.benchmark = True
    ours, eager = layer_case(layer, batch, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype],
                             backward=mode == "fwd+bwd")
    fn = _synced(ours if impl == "ours" else eager)
    benchmark.group = f"{layer[0]} B={batch} {dtype} {mode}"
    benchmark.pedantic(fn, warmup_rounds=3, rounds=30)
