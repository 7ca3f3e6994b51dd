"""Training-step speed on the CPU: fp32 or bf16 autocast, contiguous or channels-last memory (#13 item 7).

    .venv/bin/python scripts/cpu_formats.py                       # Lite0 and ResNet34, 128 px, batch 32
    .venv/bin/python scripts/cpu_formats.py --models resnet34 --size 160 --rounds 5
    .venv/bin/python scripts/cpu_formats.py --precisions fp32   # a CPU without native bf16: 6-8x slower in bf16

One training step is forward, backward and AdamW on a random batch, as ``melanoma-bench``'s
``model_step``. The four settings are timed in interleaved rounds (A B C D A B C D ...), so a CPU
whose speed drifts within minutes slows them alike, and each setting's median over rounds is
printed with its ratio to fp32 contiguous. Whether the CPU has native bf16 (AVX-512-BF16 or AMX)
decides what bf16 can gain: without it, oneDNN emulates bf16 and it is slower. Run it alone on
the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

SETTINGS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))


def step_time(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, target: torch.Tensor,
              precision: str, steps: int) -> float:
    """Seconds per training step, averaged over ``steps`` after one untimed step."""
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch).float().squeeze(1), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    """Time every setting of :data:`SETTINGS` for each model and print images/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0", "resnet34"], help="timm names")
    parser.add_argument("--size", type=int, default=128, help="image edge in pixels")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="fp32 alone on a CPU that only emulates bf16, where a bf16 step takes seconds")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}, "
          f"amx {torch.cpu._is_amx_tile_supported()}")
    torch.manual_seed(0)
    for name in args.models:
        runs = {}
        for precision, channels_last in [s for s in SETTINGS if s[0] in args.precisions]:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = timm.create_model(name, pretrained=False, num_classes=1).to(memory_format=fmt).train()
            batch = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=fmt)
            target = torch.randint(0, 2, (args.batch,)).float()
            runs[precision, channels_last] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), batch, target)
        times = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, (model, optimizer, batch, target) in runs.items():
                times[key].append(step_time(model, optimizer, batch, target, key[0], args.steps))
        base = statistics.median(times["fp32", False])
        for (precision, channels_last), values in times.items():
            median = statistics.median(values)
            print(f"{name:24s} {args.size} px batch {args.batch}  {precision} "
                  f"{'channels_last' if channels_last else 'contiguous   '}  {args.batch / median:6.1f} images/s  "
                  f"x{base / median:.2f} of fp32 contiguous  (rounds: "
                  f"{', '.join(f'{args.batch / v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
