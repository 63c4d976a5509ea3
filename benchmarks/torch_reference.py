"""Reference points from PyTorch on a CUDA GPU, for `optimizer_step.py`.

Times, on the same parameter shapes, a device-to-device copy (the bandwidth
behind the floor), `torch.optim.Adam(fused=True)` and SGD with momentum
(`foreach=True`), the fastest stock optimizers PyTorch has. Steps are timed
with CUDA events, `--steps-per-sample` steps per sample, median of `--reps`.
Prints one JSON line per measurement. Exits with a message (status 0) where
PyTorch or a CUDA device is missing: it is an optional reference.

    python benchmarks/torch_reference.py --shapes bert-large,resnet50
"""

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from shapes import shape_set  # noqa: E402


def define_flags():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="bert-large,resnet50",
                        help="comma-separated shape sets (see shapes.py)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--steps-per-sample", type=int, default=10)
    args = parser.parse_args()
    args.shapes = [s for s in args.shapes.split(",") if s]
    for name in args.shapes:
        shape_set(name)
    if args.reps < 1 or args.steps_per_sample < 1:
        parser.error("--reps and --steps-per-sample must be >= 1")
    return args


def time_ms(torch, fn, reps, k):
    """Median milliseconds per call of `fn`, `k` calls per CUDA-event sample."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(k):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / k)
    return statistics.median(samples)


def measure(torch, set_name, args):
    shapes, n_params = shape_set(set_name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    common = {"backend": "torch", "device": torch.cuda.get_device_name(),
              "shapes": set_name, "n_params": n_params,
              "n_tensors": len(shapes), "torch": torch.__version__}
    buffers = {"x": torch.randn(n_params, device="cuda", generator=gen)}
    buffers["y"] = torch.empty_like(buffers["x"])
    copy_ms = time_ms(torch, lambda: buffers["y"].copy_(buffers["x"]),
                      args.reps, args.steps_per_sample)
    bandwidth = 8 * n_params / (copy_ms * 1e-3) / 1e9
    print(json.dumps(dict(common, kind="bandwidth", ms=copy_ms,
                          gb_per_s=bandwidth,
                          what="torch copy_ (read 4 B, write 4 B)")),
          flush=True)
    buffers.clear()  # frees the copy's 2 x n_params floats
    params = [torch.nn.Parameter(0.02 * torch.randn(
        shape, device="cuda", generator=gen)) for _, shape in shapes]
    for p in params:
        p.grad = 0.02 * torch.randn(p.shape, device="cuda", generator=gen)
    optimizers = {
        "torch.Adam(fused)": (torch.optim.Adam(params, lr=1e-3, fused=True),
                              28),
        "torch.SGD-momentum(foreach)": (torch.optim.SGD(
            params, lr=0.1, momentum=0.9, foreach=True), 20),
    }
    for name, (opt, floor_bytes) in optimizers.items():
        ms = time_ms(torch, opt.step, args.reps, args.steps_per_sample)
        floor_ms = floor_bytes * n_params / (bandwidth * 1e9) * 1e3
        print(json.dumps(dict(
            common, kind="step", optimizer=name, ms=ms,
            floor_bytes_per_param=floor_bytes, floor_ms=floor_ms,
            x_floor=ms / floor_ms,
            gb_per_s=floor_bytes * n_params / (ms * 1e-3) / 1e9)),
            flush=True)
        opt.state.clear()  # frees the slots before the next optimizer


def main():
    args = define_flags()
    try:
        import torch
    except ImportError:
        print("torch_reference: PyTorch is not installed; nothing to do.")
        return
    if not torch.cuda.is_available():
        print("torch_reference: no CUDA device; nothing to do.")
        return
    for set_name in args.shapes:
        measure(torch, set_name, args)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
