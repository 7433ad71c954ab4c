"""The linear layers' two paths on this CPU: F.linear (MKL's sgemm: transformers', and minivlm's
reference path) against ops.linear's fast path (oneDNN's matmul), over the fp32 weights of
llava-interleave-qwen-0.5b (`bench generate --preset interleave-0.5b`): its decoder (Qwen1.5-0.5B:
24 layers of q/k/v/o at 1024 x 1024 and gate/up/down at 1024 x 2816, and the 151,646 x 1024
output projection) and its SigLIP so400m tower (26 layers of q/k/v/out and fc1/fc2).

    python scripts/linear_paths.py [--small]

Random weights; each row times every product of the model once per run, for 1 row (a decode
step), 4 rows (a batch of four decode steps) and a prefill's rows (761: one image and 32 text
tokens; 729 for the tower), both paths alternating in one process; median [min-max] of the runs,
and the weights' bytes read per second. --small instead times single products of small square
weights, where oneDNN's longer call decides (ops.ONEDNN_MIN_MACS: below it the fast path keeps
F.linear).
"""

import argparse
import statistics
import time

import torch

from minivlm import ops

DECODER = [(1024, 1024)] * 4 + [(2816, 1024), (2816, 1024), (1024, 2816)]  # (out, in) of one layer
DECODER = DECODER * 24 + [(151646, 1024)]  # the output projection, once
TOWER = ([(1152, 1152)] * 4 + [(4304, 1152), (1152, 4304)]) * 26


def products(shapes, rows: int, kernels: str, weights):
    inputs = {fan_in: torch.randn(rows, fan_in) for _, fan_in in shapes}

    def run():
        for (fan_out, fan_in), weight in zip(shapes, weights):
            x = inputs[fan_in] if fan_out != 151646 else inputs[fan_in][-1:]  # logits of the last row only
            ops.linear(x, weight, None, kernels)

    return run


def crossover() -> None:
    """Microseconds per product, best of two runs of many calls, both paths on the same inputs."""
    with torch.no_grad():
        for rows in (1, 4, 32, 761):
            for side in (64, 128, 256, 512, 768, 1024):
                weight, x = torch.randn(side, side), torch.randn(rows, side)
                calls = max(50, 300_000 // (rows * 10 + 50))
                best = {}
                for kernels in ("off", "auto", "off", "auto"):
                    product = torch.nn.functional.linear if kernels == "off" else torch.ops.mkldnn._linear_pointwise
                    args = (x, weight) if kernels == "off" else (x, weight, None, "none", [], "")
                    for _ in range(20):
                        product(*args)
                    start = time.perf_counter()
                    for _ in range(calls):
                        product(*args)
                    took = (time.perf_counter() - start) / calls * 1e6
                    best[kernels] = min(best.get(kernels, took), took)
                macs = rows * side * side
                print(
                    f"{rows:4d} rows x {side}x{side} ({macs:>11,} multiply-adds): F.linear {best['off']:8.1f} us, "
                    f"oneDNN {best['auto']:8.1f} us{'  <- oneDNN faster' if best['auto'] < best['off'] else ''}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="single products of small square weights instead")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.small:
        return crossover()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN matmul: {ops._ONEDNN}")
    for name, shapes, prefill, repeats in (("decoder", DECODER, 761, 3), ("SigLIP tower", TOWER, 729, 3)):
        weights = [torch.randn(fan_out, fan_in) / fan_in**0.5 for fan_out, fan_in in shapes]
        gigabytes = sum(w.numel() for w in weights) * 4 / 1e9
        for rows in (1, 4, prefill) if name == "decoder" else (prefill,):
            runs = {"off": [], "auto": []}
            calls = {kernels: products(shapes, rows, kernels, weights) for kernels in runs}
            with torch.no_grad():
                for kernels in runs:
                    calls[kernels]()  # warm-up
                for _ in range(repeats if rows > 4 else 9):
                    for kernels in runs:
                        start = time.perf_counter()
                        calls[kernels]()
                        runs[kernels].append(time.perf_counter() - start)
            line = [f"{name}, {rows} rows ({gigabytes:.2f} GB of weights):"]
            for kernels, label in (("off", "F.linear"), ("auto", "oneDNN")):
                t = runs[kernels]
                line.append(
                    f"{label} {statistics.median(t) * 1e3:.1f} ms [{min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}] "
                    f"({gigabytes / statistics.median(t):.1f} GB/s)"
                )
            ratio = statistics.median(runs["off"]) / statistics.median(runs["auto"])
            print("  ".join(line) + f"  oneDNN {ratio:.2f}x as fast")


if __name__ == "__main__":
    main()
