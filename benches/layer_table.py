"""Per-layer speed table: fastdcgan's fused conv/convT+BN+act ops vs the eager PyTorch sequence
(cuDNN conv + BatchNorm2d + activation, same dtype, channels_last), every DCGAN layer, forward and
forward+backward (training-mode BN), fp32 (TF32 on both sides) and bf16, B = 128 and 512, each as
called op by op and replayed from a CUDA graph (the GPU's time alone, as the trainer runs); then the
Generator's inference at B = 512 (ours vs eager vs torch.compile, and each model replayed from a
CUDA graph: ours vs the best peer) and whole-network training forward+backward at B = 128 (ours:
the chained fused network).

Timing: triton.testing.do_bench (CUDA events, median). Prints a markdown table.
    python benches/layer_table.py [--batches 128,512] [--dtypes fp32,bf16] [--no-compile]
"""
import argparse
import copy
import time

import torch
import torch.nn.functional as F

from peers import captured

# name, transposed, cin, cout, input size, stride, padding, batch norm, activation
LAYERS = [
    ("G0 z->4x4", True, 100, 512, 1, 1, 0, True, "relu"),
    ("G1 4->8", True, 512, 256, 4, 2, 1, True, "relu"),
    ("G2 8->16", True, 256, 128, 8, 2, 1, True, "relu"),
    ("G3 16->32", True, 128, 64, 16, 2, 1, True, "relu"),
    ("G4 32->64", True, 64, 3, 32, 2, 1, False, "tanh"),
    ("D0 64->32", False, 3, 64, 64, 2, 1, False, "leaky_relu"),
    ("D1 32->16", False, 64, 128, 32, 2, 1, True, "leaky_relu"),
    ("D2 16->8", False, 128, 256, 16, 2, 1, True, "leaky_relu"),
    ("D3 8->4", False, 256, 512, 8, 2, 1, True, "leaky_relu"),
    ("D4 4->1", False, 512, 1, 4, 1, 0, False, "sigmoid"),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ACT = {"relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, 0.2), "tanh": torch.tanh,
        "sigmoid": torch.sigmoid}


def layer_case(layer, batch, dtype, backward, device="cuda"):
    """(ours, eager): zero-argument callables running one layer (and its backward if asked) on
    fresh random inputs. Both take a channels_last input; BN parameters stay fp32."""
    from fastdcgan import ops

    _, transposed, cin, cout, hw, stride, pad, bn, act = layer
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cin, hw, hw, generator=g).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(backward)
    wshape = (cin, cout, 4, 4) if transposed else (cout, cin, 4, 4)
    w = (torch.randn(wshape, generator=g) * 0.02).to(device, dtype).requires_grad_(backward)
    if bn:
        gamma = (1 + 0.02 * torch.randn(cout, generator=g)).to(device).requires_grad_(backward)
        beta = torch.zeros(cout, device=device, requires_grad=backward)
        rm, rv = torch.zeros(cout, device=device), torch.ones(cout, device=device)
    else:
        gamma = beta = rm = rv = None
    op = ops.conv_transpose_bn_act if transposed else ops.conv_bn_act
    conv = F.conv_transpose2d if transposed else F.conv2d
    oh = (hw - 1) * stride - 2 * pad + 4 if transposed else (hw + 2 * pad - 4) // stride + 1
    grad = torch.randn(batch, cout, oh, oh, generator=g).to(device, dtype)
    grad = grad.contiguous(memory_format=torch.channels_last)

    def ours():
        y = op(x, w, gamma, beta, rm, rv, stride=stride, padding=pad, training=True, activation=act)
        if backward:
            y.backward(grad)

    def eager():
        y = conv(x, w, stride=stride, padding=pad)
        if bn:
            y = F.batch_norm(y, rm, rv, gamma, beta, training=True)
        y = _ACT[act](y)
        if backward:
            y.backward(grad)

    return ours, eager


def bench(fn):
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=40)


def generator_cases(batch, dtype, compiled):
    """Generator inference (eval, no grad): {name: callable}. "ours (CUDA graph)" and
    "eager + CUDA graph" replay each model through fastdcgan.sampler.CapturedGenerator (the
    z copy into the graph's input included): the same host-overhead removal on both sides."""
    from fastdcgan import Generator
    from fastdcgan.sampler import CapturedGenerator

    torch.manual_seed(0)
    ours = Generator(backend="triton").cuda().to(dtype).eval()
    eager = copy.deepcopy(ours).set_backend("reference").to(memory_format=torch.channels_last)
    z = torch.randn(batch, 100, 1, 1, device="cuda", dtype=dtype)
    ours_graph, eager_graph = CapturedGenerator(ours, batch), CapturedGenerator(eager, batch)
    cases = {"ours": lambda: ours(z), "ours (CUDA graph)": lambda: ours_graph(z),
             "eager": lambda: eager(z), "eager + CUDA graph": lambda: eager_graph(z)}
    if compiled:
        comp = torch.compile(eager)
        cases["torch.compile"] = lambda: comp(z)
    return cases


def network_cases(batch, dtype):
    """Whole-network training forward+backward (training BN): G(z) then D(image)."""
    from fastdcgan import Discriminator, Generator

    torch.manual_seed(0)
    out = {}
    for backend in ("triton", "reference"):
        gen = Generator(backend=backend).cuda().to(dtype)
        disc = Discriminator(backend=backend).cuda().to(dtype)
        if backend == "reference":
            gen, disc = (m.to(memory_format=torch.channels_last) for m in (gen, disc))
        z = torch.randn(batch, 100, 1, 1, device="cuda", dtype=dtype)

        def step(gen=gen, disc=disc, z=z):
            disc(gen(z)).float().sum().backward()

        out["ours" if backend == "triton" else "eager"] = step
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="128,512")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile in the G inference rows")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "layer_table.py needs a CUDA GPU"
    torch.backends.cudnn.benchmark = True
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| case | ours ms | eager ms | speedup | ours, CUDA graph | eager, CUDA graph | speedup |")
    print("|---|---|---|---|---|---|---|")

    def layer_rows(batch):
        # each side also replayed from a CUDA graph (as the trainer runs it): the GPU time alone,
        # without either side's per-op host path
        for dt in dtypes:
            for backward in (False, True):
                for layer in LAYERS:
                    ours, eager = layer_case(layer, batch, DTYPES[dt], backward)
                    to, te = bench(ours), bench(eager)
                    go, ge = bench(captured(ours)), bench(captured(eager))
                    mode = "fwd+bwd" if backward else "fwd"
                    print(f"| {layer[0]} B={batch} {dt} {mode} | {to:.3f} | {te:.3f} | {te / to:.2f}x "
                          f"| {go:.3f} | {ge:.3f} | {ge / go:.2f}x |", flush=True)

    # the first batch's layers, then the whole networks, then the other batches (the table is
    # printed row by row, so a time limit cuts the least important rows)
    layer_rows(batches[0])
    for dt in dtypes:
        with torch.no_grad():
            cases = generator_cases(512, DTYPES[dt], not args.no_compile)
            times = {k: bench(f) for k, f in cases.items()}
        peers = {k: v for k, v in times.items() if not k.startswith("ours")}
        extra = "".join(f", {k} {v:.3f}" for k, v in peers.items() if k != "eager")
        print(f"| Generator inference B=512 {dt}{extra} | {times['ours']:.3f} | {times['eager']:.3f} | "
              f"{times['eager'] / times['ours']:.2f}x | | | |", flush=True)
        best = min(peers, key=peers.get)
        graph = times["ours (CUDA graph)"]
        print(f"| Generator inference B=512 {dt} CUDA graph, vs the best peer ({best}) | {graph:.3f} | "
              f"{peers[best]:.3f} | {peers[best] / graph:.2f}x | | | |", flush=True)
    for dt in dtypes:
        cases = network_cases(128, DTYPES[dt])
        to, te = bench(cases["ours"]), bench(cases["eager"])
        print(f"| G+D train fwd+bwd B=128 {dt} | {to:.3f} | {te:.3f} | {te / to:.2f}x | | | |",
              flush=True)
    for batch in batches[1:]:
        layer_rows(batch)
    print(f"\n(total {time.time() - t0:.0f} s; eager = cuDNN channels_last, fp32 uses TF32 on both sides)")


if __name__ == "__main__":
    main()
