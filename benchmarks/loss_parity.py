"""Compare two training runs' loss_log.csv: running-mean loss agreement.

    python benchmarks/loss_parity.py RUN_A/loss_log.csv RUN_B/loss_log.csv [--steps 200] [--tol 0.01]

Prints the running-mean loss of both runs at a few steps and the largest
difference from step 20 on (the first steps' means are dominated by the
initial loss of ~11). Exit status 1 when the final difference exceeds --tol.
"""
import argparse
import csv
import sys


def losses(path, steps):
    rows = {}
    for r in csv.DictReader(open(path)):
        rows[int(r["step"])] = float(r["loss"])  # the last row of a step wins
    return [rows[s] for s in sorted(rows) if s <= steps]


def running_mean(path, steps):
    out, total = [], 0.0
    for i, x in enumerate(losses(path, steps), 1):
        total += x
        out.append(total / i)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tol", type=float, default=0.01)
    args = ap.parse_args()
    ma, mb = running_mean(args.a, args.steps), running_mean(args.b, args.steps)
    n = min(len(ma), len(mb))
    for s in (10, 50, 100, 150, 200):
        if s <= n:
            print(f"step {s:4d}: running mean {ma[s - 1]:.4f} vs {mb[s - 1]:.4f} (diff {ma[s - 1] - mb[s - 1]:+.4f})")
    worst = max(abs(x - y) for x, y in zip(ma[19:n], mb[19:n])) if n > 20 else float("nan")
    final = abs(ma[n - 1] - mb[n - 1])
    ok = final <= args.tol
    print(f"{n} steps compared; final running-mean diff {final:.4f}, max from step 20 {worst:.4f}; "
          f"target <= {args.tol}: {'met' if ok else 'NOT met'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
