"""benchmarks/run.py, the benchmark driver: the cpu-smoke scenario end to end on CPU through the
tutorial's scripts (with --base, into a temporary results file), and its parts: the steady state,
the RESULTS section, appending, the nvidia-smi memory sampler (with a stand-in nvidia-smi), GPU
scenarios skipped on a machine without one."""
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "run.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod
    spec.loader.exec_module(mod)
    return mod


br = _load()


def _driver(*args, env, timeout=600):
    return subprocess.run([sys.executable, str(RUN), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _rows(out: Path) -> list:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ parts

def test_steady_state_leaves_out_warmup_and_profiled_steps():
    times = [0.0]
    for step in range(2, 41):  # 40 steps: slow first ones, 0.3 s later, slow profiled steps 11..14
        times.append(times[-1] + (5.0 if step <= 3 else 0.9 if 11 <= step <= 14 else 0.3))
    rows = [{"step": s, "time": t} for s, t in zip(range(1, 41), times)]
    med, span, n = br.steady_state(rows)
    assert span == [12, 40] and n == 29 and med == pytest.approx(0.3)
    med, span, n = br.steady_state(rows, exclude=set(range(11, 15)))
    assert span == [15, 40] and n == 26 and med == pytest.approx(0.3)
    short = rows[:6]  # a short run keeps its last 3 steps' times
    assert br.steady_state(short)[1:] == ([5, 6], 2)


def test_every_scenario_is_listed_with_its_settings():
    text = br.scenario_table()
    for name in br.SCENARIOS:
        assert name in text
    s = br.SCENARIOS["train-0.1b-m16"]
    assert (s.n_layer, s.n_embd, s.ctx, s.m_bsz, s.grad_cp, s.strategy, s.precision, s.steps, s.compile) == \
        (12, 768, 4096, 16, 1, "deepspeed_stage_2", "bf16", 40, "1")
    assert br.expand(["train-0.1b-m16", "matmul"])[0] == "matmul"  # its rate is the MFU of the runs after it
    with pytest.raises(SystemExit):
        br.expand(["no-such-scenario"])


def test_append_keeps_what_the_file_held(tmp_path):
    f = tmp_path / "RESULTS.md"
    old = "# Results\n\n## 2026-11-28 — an older section\n\nfigures"  # no final newline
    f.write_text(old)
    br.append_text(f, "## new one\n\nA\n")
    br.append_text(f, "## newer\n\nB\n")
    text = f.read_text()
    assert text.startswith(old) and text.endswith("## new one\n\nA\n\n## newer\n\nB\n")
    assert text.index("## new one") < text.index("## newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md"]  # no temporary file left


def _gpu_row(side, kts, ms, mem, alloc, commit):
    return {
        "scenario": "train-0.1b-m16", "kind": "train", "date": "2026-12-03T10:00:00+00:00", "call": "c1",
        "status": "ok", "note": "", "card": "1x NVIDIA H200 (143771 MiB, driver 580.159.04)",
        "host": "AMD EPYC, 16 cores", "versions": {"python": "3.12.3", "torch": "2.11.0+cu130"},
        "library": {"side": side, "path": "RWKV-v7" if side == "current" else ".base/RWKV-v7",
                    "scripts": "RWKV-v7/train_temp", "commit": commit, "modified": [], "rwkvlm_sha256": "0" * 12},
        "setup": "1 GPU x M_BSZ 16, ctx 4096", "command": f"sh demo-training-run.sh ({side})", "commands": [],
        "driver_command": "python benchmarks/run.py train-0.1b-m16 --out /tmp/o --base .base/RWKV-v7",
        "figures": {"kt_s": kts, "kt_s_per_gpu": kts, "step_ms": ms, "mfu": 0.33, "gpu_mem_card_peak_gib": mem,
                    "torch_peak_allocated_gib": alloc, "loss_first": 11.2510, "loss_last": 5.0, "wall_s": 150,
                    "steady_steps": "15..40", "mfu_basis": "measured 773 TFLOP/s (matmul scenario)",
                    "vs_original": {"card": "H200", "kt_s": 160.0, "gib": 31.1, "speed": round(kts / 160, 2),
                                    "memory": round(mem / 31.1, 2), "met": True}},
        "run_dir": "/tmp/o/x", "rehearsal": False}


def test_section_has_date_card_commit_command_figures_and_before_after():
    rows = [_gpu_row("current", 218.5, 300.0, 10.82, 8.81, "f3ea169"),
            _gpu_row("base", 214.2, 306.0, 10.62, 8.70, "d70fddd")]
    text = br.section(rows, "/tmp/o")
    lines = text.splitlines()
    assert lines[0].startswith("## 2026-12-03 10:00 — benchmarks/run.py: train-0.1b-m16, before/after (1x NVIDIA H200")
    for want in ("- date: 2026-12-03T10:00:00+00:00", "- card: 1x NVIDIA H200 (143771 MiB, driver 580.159.04)",
                 "- commit: f3ea169 (after)", "- before (--base): .base/RWKV-v7 (d70fddd",
                 "- command: `python benchmarks/run.py train-0.1b-m16 --out /tmp/o --base .base/RWKV-v7`",
                 "| train-0.1b-m16 | after, f3ea169 |", "| train-0.1b-m16 | before, d70fddd |", "**218.5**", "33.0%",
                 "10.82 GiB (card)", "1.37x / 0.35x of 160.0 kt/s at 31.1 GiB (met)",
                 "| train-0.1b-m16 | 214.2 -> 218.5 (+2.0%) | 306.0 -> 300.0 (-2.0%) | 10.62 GiB -> 10.82 GiB (+1.9%) |",
                 "MFU basis: measured 773 TFLOP/s"):
        assert want in text, want
    assert text.endswith("\n")
    rows[0]["figures"]["cuda_memory"] = {"step": 2, "held": 2.55, "peak_forward_backward": 3.59, "peak_optimizer": 3.95,
                                         "peak_before": 4.1, "reserved_peak": 4.6, "card_used": 5.9}
    assert ("PyTorch's memory at step 2: 2.55 GiB held, peak 3.59 GiB in forward + backward, 3.95 GiB in the optimiser "
            "step; before it at most 4.1 GiB allocated, 4.6 GiB reserved; the card 5.9 GiB in use after it") \
        in br.section(rows, "/tmp/o")
    rows[0]["figures"]["cuda_memory"]["outside_allocator"] = {"setup": 0.52, "after_strategy_setup": 0.9,
                                                               "after_step": 1.3}
    assert ("the card 5.9 GiB in use after it; outside PyTorch's allocator: 0.52 GiB setup, 0.9 GiB after strategy "
            "setup, 1.3 GiB after step") in br.section(rows, "/tmp/o")
    rows[0]["figures"]["eval"] = {"n": 40, "correct": 30, "accuracy": 75.0, "restated": 34, "by_kind": {"ascii": 75.0},
                                  "by_split": {"seen": {"n": 20, "accuracy": 90.0, "restated": 19,
                                                        "by_kind": {"ascii": 90.0}},
                                               "unseen": {"n": 20, "accuracy": 60.0, "restated": 15,
                                                          "by_kind": {"ascii": 60.0}}}}
    assert ("held-out exact match 75.0% (30/40): ascii 75.0%; seen wordings 90.0% of 20: ascii 90.0%; unseen "
            "wordings 60.0% of 20: ascii 60.0%; of the 10 misses 6 misread the problem (its restatement wrong)") \
        in br.section(rows, "/tmp/o")


def test_sampler_reads_nvidia_smi_for_the_card_and_the_runs_processes(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"  # a stand-in: one card, the run's process and a stranger's
    smi.write_text('#!/bin/sh\n'
                   'case "$*" in\n'
                   '  *compute-apps*) while :; do echo "$FAKE_PID, 1234"; echo "999999, 50"; sleep 0.1; done ;;\n'
                   '  *-lms*) while :; do echo "0, 2048"; sleep 0.1; done ;;\n'
                   '  *) echo "0, 100" ;;\n'
                   'esac\n')
    smi.chmod(0o755)
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_PID", str(child.pid))
        s = br.Sampler([0], {child.pid}, tmp_path / "gpu_mem.csv")
        time.sleep(1.5)
        mem = s.stop()
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert mem["gpu_mem_process_peak_gib"] == round(1234 / 1024, 2)  # the stranger's 50 MiB left out
    assert mem["gpu_mem_card_peak_gib"] == 2.0 and mem["gpu_mem_card_before_mib"] == {"0": 100}
    assert "0, 2048" in (tmp_path / "gpu_mem.csv").read_text()
    assert br.mem_text(mem).startswith("1.21 GiB (process; card 2.00 GiB)")


def test_gpu_scenarios_without_a_gpu_are_skipped_with_a_note(tmp_path, cpu_env):
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    r = _driver("kernels", "train-0.1b-2gpu", "--out", out, "--results", results, env=cpu_env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kernels: skipped: needs 1 GPU, 0 visible to PyTorch" in r.stdout
    rows = _rows(out)
    assert [(x["scenario"], x["status"]) for x in rows] == [("kernels", "skipped"), ("train-0.1b-2gpu", "skipped")]
    assert rows[1]["note"].startswith("needs 2 GPUs")
    text = results.read_text()
    assert "Not run or not finished:" in text and "- train-0.1b-2gpu (" in text and "needs 2 GPUs" in text


def test_dry_run_shows_the_scripts_with_the_scenarios_variables(tmp_path, cpu_env):
    r = _driver("train-0.1b-m16", "--out", tmp_path / "out", "--dry-run", env=cpu_env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "demo-training-run.sh" in ln)
    for flag in ("--micro_bsz 16", "--grad_cp 1", "--devices 1", "--n_layer 12 --n_embd 768 --ctx_len 4096",
                 "--accelerator gpu --precision bf16 --strategy deepspeed_stage_2 --compile 1", "--profile_steps 3",
                 f"--my_exit_tokens {40 * 16 * 4096}", "CUDA_VISIBLE_DEVICES=0"):
        assert flag in line, flag
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_dry_run_of_the_arithmetic_run_plans_tokens_and_corpus_from_the_flags(tmp_path, cpu_env):
    r = _driver("arith-0.1b", "--kts", 220, "--train-s", 818, "--docs", 200000, "--out", tmp_path / "out",
                "--dry-run", env=cpu_env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = 220 * 1000 * 818 // (16 * 4096)  # one GPU stands in for "every GPU" on a machine without one
    assert f"818 s of tokens, --epoch_save 1; {steps} steps of 65,536 tokens" in r.stdout, r.stdout
    line = next(ln for ln in r.stdout.splitlines() if "demo-training-run.sh" in ln)
    assert f"--my_exit_tokens {steps * 16 * 4096}" in line and "/data/arith-200000x30-ctx4096/demo" in line, line


# ------------------------------------------------------------------------------------ end to end

@pytest.mark.slow  # two tiny CPU trainings through the scripts: about a minute on 2 cores
def test_cpu_smoke_with_base_writes_rows_and_a_section(tmp_path, cpu_env):
    base = tmp_path / "base" / "RWKV-v7"  # an "older" copy of the library: here the same code
    ignore = shutil.ignore_patterns("__pycache__", "out", "*.egg-info")
    for part in ("rwkvlm", "train_temp", "cuda"):
        shutil.copytree(REPO / "RWKV-v7" / part, base / part, ignore=ignore)
    shutil.copy(REPO / "RWKV-v7" / "evaluate.py", base / "evaluate.py")
    results = tmp_path / "RESULTS.md"
    old = "# Benchmark results\n\n## 2026-11-28 — an earlier section\n\nfigures\n"
    results.write_text(old)
    out = tmp_path / "out"
    r = _driver("cpu-smoke", "kernels", "--steps", "6", "--out", out, "--base", base, "--base-commit", "abc1234",
                "--results", results, "--progress-s", "10", env=cpu_env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "=== " in r.stdout and "cpu-smoke [base:" in r.stdout  # progress lines on stdout

    rows = _rows(out)
    assert [(x["scenario"], x["status"], (x["library"] or {}).get("side")) for x in rows] == [
        ("cpu-smoke", "ok", "current"), ("cpu-smoke", "ok", "base"), ("kernels", "skipped", "current")]
    for row in rows[:2]:
        datetime.datetime.fromisoformat(row["date"])
        assert row["card"].startswith("CPU: ") and row["call"] == rows[0]["call"]
        assert "demo-training-run.sh" in row["command"] and "--micro_bsz 4" in row["command"]
        assert "--n_layer 2 --n_embd 64 --ctx_len 128" in row["command"]
        assert any("demo-training-prepare.sh" in c for c in row["commands"])
        f = row["figures"]
        assert f["rc"] == 0 and f["steps"] == 6 and f["steps_planned"] == 6 and f["tokens"] == 6 * 4 * 128
        assert f["kt_s"] > 0 and f["step_ms"] > 0 and f["steady_steps"] == "5..6" and f["tokens_per_s"] > 0
        assert f["loss_first"] > 10 and f["loss_last"] < f["loss_first"]
        assert f["host_rss_peak_gib"] > 0.1 and f["data"]["tokens"] > 3 * 128
        assert f["params"] > 0 and "mfu" not in f  # no MFU on CPU
        run_dir = Path(row["run_dir"])
        assert (run_dir / "train.txt").is_file() and (run_dir / "proj" / "loss_log.csv").is_file()
        assert not list(run_dir.rglob("*.pth"))  # weights removed (--keep-weights keeps them)
    cur, old_lib = rows[0]["library"], rows[1]["library"]
    assert cur["path"] == "RWKV-v7" and cur["rwkvlm_sha256"] == old_lib["rwkvlm_sha256"]
    assert old_lib["path"] == str(base) and old_lib["commit"] == "abc1234"
    assert old_lib["scripts"] == str(base / "train_temp") and f"PYTHONPATH={base}:" in rows[1]["command"]
    assert rows[2]["note"].startswith("needs 1 GPU")

    text = results.read_text()
    assert text.startswith(old)  # the earlier sections are kept as they were
    sec = text[len(old):].lstrip("\n")
    assert sec == (out / "report.md").read_text()
    assert sec.startswith("## ") and "benchmarks/run.py: cpu-smoke, kernels, before/after" in sec.splitlines()[0]
    for want in ("- date: ", "- card: none (CPU only); host: ", "- commit: ", f"- before (--base): {base} (abc1234",
                 "- command: `python benchmarks/run.py cpu-smoke kernels --steps 6",
                 "| scenario | library | setup | status | kt/s (per GPU) | ms/step |", "| cpu-smoke | after, ",
                 "| cpu-smoke | before, abc1234 |", "Before / after", "- kernels (", "needs 1 GPU",
                 "Commands (repository root):"):
        assert want in sec, want


@pytest.mark.slow  # a tiny CPU training through the scripts, its evaluation and a chat: ~25 s on 2 cores
def test_arithmetic_rehearsal_evaluates_and_chats_in_one_conversation(tmp_path, cpu_env):
    out = tmp_path / "out"
    r = _driver("arith-0.1b", "--rehearse", "--chat", "--out", out, env=cpu_env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (row,) = _rows(out)
    f = row["figures"]
    assert f["eval"]["n"] == 8 and set(f["eval"]["by_split"]) == {"seen", "unseen"}
    assert f["chat"]["rc"] == 0
    text = (out / "arith-0.1b" / "chat.txt").read_text()
    assert text == f["chat"]["text"] and text.count("\nAssistant:") == len(br.CHAT_QUESTIONS)
    positions = [text.index(f"User: {q}\n") for q in br.CHAT_QUESTIONS]
    assert positions == sorted(positions)  # each question once, in order, in one session
    assert "chat.py session (greedy, 8 questions)" in (out / "report.md").read_text()
