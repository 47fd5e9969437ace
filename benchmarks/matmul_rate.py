"""The card's measured bf16 matmul rate (the MFU denominator): 8192^3 products on random data,
timed with CUDA events, median of 30 after a warm-up."""
import statistics

import torch

if not torch.cuda.is_available():
    raise SystemExit("matmul_rate.py needs a CUDA GPU")
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(5):
    a @ b
times = []
for _ in range(30):
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    a @ b
    e1.record()
    e1.synchronize()
    times.append(e0.elapsed_time(e1) / 1e3)
print(f"{torch.cuda.get_device_name()}: bf16 matmul {n}^3: {2 * n**3 / statistics.median(times) / 1e12:.0f} TFLOP/s")
