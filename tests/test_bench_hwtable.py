"""benchmarks/run.py's hardware-table scenarios (hw-*): the tutorial's sizes through its two scripts,
each row one call; the M_BSZ planned from the M_BSZ 1 row's measured memory, halved on out of memory;
the table with the tutorial's figures beside ours. On CPU: the commands (--dry-run), the plan, the
table, the retry (the launches stubbed), and a rehearsal through the scripts (slow)."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_bench_driver import RUN, _driver, _rows, br

HW = [n for n in br.SCENARIOS if n.startswith("hw-")]


def test_the_rows_and_their_settings():
    assert br.GROUPS["hwtable"] == ["matmul"] + [f"hw-{s}-{m}" for s in ("0.1b", "0.4b", "1.5b", "3b", "7b")
                                                 for m in ("m1", "mmax")]
    shapes = {"0.1b": (12, 768), "0.4b": (24, 1024), "1.5b": (24, 2048), "3b": (32, 2560), "7b": (32, 4096),
              "14b": (61, 4096)}
    for name in HW:
        sc = br.SCENARIOS[name]
        size = name.split("-")[1]
        assert (sc.n_layer, sc.n_embd) == shapes[size]
        assert (sc.ctx, sc.grad_cp, sc.precision, sc.kind) == (4096, 1, "bf16", "train")
        assert sc.strategy == ("deepspeed_stage_2_offload" if size in ("7b", "14b") else "deepspeed_stage_2")
        assert sc.budget_s <= 600 and sc.limit_s <= 600, name  # one 600 s call per row
        assert name.endswith("-m1") == (sc.m_bsz == 1 and not sc.plan_from)
        assert ("--resume_states", "0") == sc.flags[-2:] if sc.n_embd >= 2560 else not sc.flags
        assert sc.table[0].upper().startswith(size.upper())
    targets = {n: br.SCENARIOS[n].table[2] for n in HW if n.endswith("-m1")}
    assert targets == {"hw-0.1b-m1": 4905, "hw-0.4b-m1": 9310, "hw-1.5b-m1": 31578, "hw-3b-m1": 68516,
                       "hw-7b-m1": 0, "hw-14b-m1": 0}  # 0.75x the tutorial's MB (MiB); 7B / 14B: "fits"
    assert br.SCENARIOS["hw-14b-m1"].host_gib >= 200 and br.SCENARIOS["hw-7b-m1"].host_gib < 128


def test_dry_run_prints_both_scripts_of_every_row(tmp_path, cpu_env):
    out = tmp_path / "out"
    r = _driver("hwtable", "hw-14b-m1", "--out", out, "--dry-run", env=cpu_env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    prep = [ln for ln in r.stdout.splitlines() if "demo-training-prepare.sh --proj_dir" in ln]
    run = [ln for ln in r.stdout.splitlines() if "demo-training-run.sh --proj_dir" in ln]
    assert len(prep) == len(run) == len(HW)
    for line in prep:  # the prepare draws rwkv-init.pth on the run's GPU
        assert line.lstrip().startswith("$ CUDA_VISIBLE_DEVICES=0 sh RWKV-v7/train_temp/demo-training-prepare.sh")
    by_row = dict(zip(HW, run))
    for name, line in by_row.items():
        sc = br.SCENARIOS[name]
        for flag in (f"--n_layer {sc.n_layer} --n_embd {sc.n_embd} --ctx_len 4096", f"--strategy {sc.strategy}",
                     "--grad_cp 1", "--precision bf16", f"--micro_bsz {sc.m_bsz}",
                     f"--my_exit_tokens {sc.steps * sc.m_bsz * 4096}"):
            assert flag in line, (name, flag, line)
    assert "--resume_states 0" in by_row["hw-7b-m1"] and "--resume_states 0" not in by_row["hw-1.5b-m1"]
    assert "M_BSZ 8: the scenario's fallback 8: no hw-7b-m1 row with measured GPU memory" in r.stdout
    assert not (out / "results.jsonl").exists()


def _m1_row(out: Path, scenario: str, mem: dict, sha="x"):
    row = {"scenario": scenario, "status": "ok", "rehearsal": False, "run_dir": f"{out}/{scenario}",
           "library": {"rwkvlm_sha256": sha}, "figures": {"cuda_memory": mem}}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _driver_obj(tmp_path, *argv):
    ns = SimpleNamespace(out=str(tmp_path), data_dir=None, m_bsz=None, rehearse=False, dry_run=False, budget=None,
                         limit=None, progress_s=30.0, extra="", keep_weights=False, kts=None, train_s=None,
                         eval_n=None)
    for k, v in zip(argv[::2], argv[1::2]):
        setattr(ns, k, v)
    d = br.Driver(ns, ["test"])
    d.libs, d.versions = [SimpleNamespace(sha="x")], {}
    return d


def test_the_larger_m_bsz_is_planned_from_the_measured_memory(tmp_path):
    d = _driver_obj(tmp_path)
    sc = br.SCENARIOS["hw-3b-mmax"]
    m, why = d.plan_m_bsz(sc)
    assert m == sc.m_bsz and "fallback" in why
    # the M_BSZ 1 row: 55 GiB held, 6 GiB per sample, 61 GiB in the optimiser step, of 139.8 GiB:
    # 55 + 8 x 6 = 103 <= 0.92 x 139.8 - 1.5 = 127.1, 55 + 16 x 6 = 151 is not
    _m1_row(tmp_path, "hw-3b-m1", {"total": 139.8, "held": 55.0, "per_sample": 6.0, "peak_optimizer": 61.0,
                                   "peak_forward_backward": 61.0, "step": 2, "m_bsz": 1})
    m, why = d.plan_m_bsz(sc)
    assert m == 8 and "55.0 GiB held + M_BSZ x 6.00 GiB per sample <= 127.1 GiB" in why, why
    _m1_row(tmp_path, "hw-3b-m1", {"total": 139.8, "held": 5.0, "per_sample": 0.3, "peak_optimizer": 6.0,
                                   "peak_forward_backward": 5.3, "step": 2, "m_bsz": 1})
    assert d.plan_m_bsz(sc)[0] == 128  # at most 128: 40320 / 128 = 315 steps per mini-epoch
    d.args.m_bsz = 2
    assert d.plan_m_bsz(sc) == (2, "--m-bsz")


def test_a_planned_row_that_runs_out_of_memory_runs_again_at_half(tmp_path, monkeypatch):
    d = _driver_obj(tmp_path)
    d.ngpu, d.cards, d.smi, d.torch_gpus, d.host = 1, [0], [], ["NVIDIA H200"], "host"
    sc = dataclasses.replace(br.SCENARIOS["hw-0.1b-mmax"], steps=4, warmup=1)
    lib = br.Library("current", br.LIB, br.LIB / "train_temp", "abc", [], "x")
    rundir = tmp_path / "row"
    rundir.mkdir()
    monkeypatch.setattr(d, "ensure_data", lambda docs, copies, ctx: {"base": "DATA", "tokens": 10**6,
                                                                     "magic_prime": 101})

    def prepare(prep, env, rd):
        (rundir / "proj").mkdir()
        (rundir / "proj" / "rwkv-init.pth").write_bytes(b"init")
        (rd / "prepare.txt").write_text("wrote rwkv-init.pth (torch.bfloat16): init 2.5 s, write 1.5 s\n")
        return 9.0

    launches = []

    def launch(procs, limit, watch=None):
        argv, _, _, log = procs[0]
        m = int(argv[argv.index("--micro_bsz") + 1])
        proj = Path(argv[argv.index("--proj_dir") + 1])
        launches.append((m, proj.name))
        watch.memory = {"gpu_mem_process_peak_gib": 10.0}
        if len(launches) == 1:
            Path(log).write_text("ERROR: the GPU ran out of memory during step 1 (this run's first step): ...\n")
            return [2], 5.0, False
        assert (proj / "rwkv-init.pth").read_bytes() == b"init"  # the same init, linked
        Path(log).write_text("ok\n")
        t = 1000.0
        rows = ["step,tokens,loss,lr,kt_s,time"] + [f"{s},{s * m * 4096},{10 - s},0.001,1.0,{t + s}"
                                                      for s in range(1, 5)]
        (proj / "loss_log.csv").write_text("\n".join(rows) + "\n")
        (proj / "train_config.json").write_text(json.dumps({"train_start_s": 20.0, "first_step_s": 31.0}))
        return [0], 30.0, False

    monkeypatch.setattr(d, "prepare", prepare)
    monkeypatch.setattr(d, "launch", launch)
    row = d.base_row(sc, lib, [0])
    row["settings"] = {}
    d.run_train(sc, lib, [0], rundir, row)
    f = row["figures"]
    assert launches == [(64, "proj"), (32, "proj-m32")]
    assert row["status"] == "ok" and f["out_of_memory_at_m_bsz"] == [64] and f["m_bsz"] == 32
    assert row["settings"]["m_bsz"] == 32 and "M_BSZ 32" in row["setup"]
    assert f["prepare_s"] == 9.0 and (f["init_s"], f["write_s"]) == (2.5, 1.5)
    assert f["trainer_train_start_s"] == 20.0 and f["trainer_first_step_s"] == 31.0
    assert "launch_to_first_step_s" in f and f["steps"] == 4
    assert not list(rundir.rglob("*.pth"))  # weights removed from both PROJ_DIRs


def _row(scenario, status="ok", **fig):
    return {"scenario": scenario, "status": status, "note": "" if status == "ok" else "stopped", "kind": "train",
            "settings": {"m_bsz": fig.get("m_bsz", 1)}, "library": {"commit": "abc1234"}, "figures": fig}


def test_the_table_puts_the_tutorials_figures_beside_ours():
    rows = [_row("hw-0.1b-m1", m_bsz=1, strategy="deepspeed_stage_2", gpu_mem_process_peak_gib=4.5, kt_s=30.1,
                 mfu=0.012, params=191084544, prepare_s=21.0, init_s=3.0, write_s=1.0, launch_to_first_step_s=95.0,
                 trainer_train_start_s=40.0, host_rss_peak_gib=5.5),
            _row("hw-1.5b-m1", m_bsz=1, strategy="deepspeed_stage_2", gpu_mem_process_peak_gib=34.2, kt_s=15.8),
            _row("hw-7b-m1", status="failed", m_bsz=1, strategy="deepspeed_stage_2_offload"),
            _row("hw-7b-m1", m_bsz=1, strategy="deepspeed_stage_2_offload", gpu_mem_process_peak_gib=49.0,
                 host_rss_peak_gib=117.0, kt_s=0.9),
            _row("hw-7b-m1", status="failed", m_bsz=1)]  # an ok row is not replaced by a later failure
    text = br.hw_table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| model | N_LAYER-N_EMBD | parameters | the tutorial's VRAM (M_BSZ 1) |")
    assert len(lines) == 5, text
    assert lines[2].startswith("| 0.1B | L12-D768 | 0.19B | 6540 MB | deepspeed_stage_2 | 1 | 4.50 GiB (4608 MiB) "
                               "| <= 4905 MiB: met | 30.1 | 1.2% | 5.5 GiB | 21 s (init 3 s, write 1 s) | 95 s "
                               "(set-up 40 s) | ok | abc1234 |"), lines[2]
    assert "| 1.5B | L24-D2048 |" in lines[3] and "<= 31578 MiB: NOT met" in lines[3]
    assert lines[4].startswith("| 7B | L32-D4096 | - | 4 x RTX 4090: out of memory | deepspeed_stage_2_offload |")
    assert "fits one card" in lines[4] and "117.0 GiB" in lines[4] and "| ok |" in lines[4]


@pytest.mark.slow  # three tiny CPU trainings through the scripts
def test_rehearsal_records_the_tables_figures(tmp_path, cpu_env):
    out = tmp_path / "out"
    r = _driver("hw-0.1b-m1", "hw-0.1b-mmax", "hw-7b-m1", "--rehearse", "--out", out, env=cpu_env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = _rows(out)
    assert [(x["scenario"], x["status"]) for x in rows] == [("hw-0.1b-m1", "ok"), ("hw-0.1b-mmax", "ok"),
                                                            ("hw-7b-m1", "ok")]
    for row in rows:
        f = row["figures"]
        assert f["prepare_s"] > 0 and f["init_s"] >= 0 and f["launch_to_first_step_s"] > 0
        assert 0 < f["trainer_train_start_s"] <= f["trainer_first_step_s"]
        assert f["steps"] == 12 and f["kt_s"] > 0 and f["host_rss_peak_gib"] > 0
    assert rows[1]["figures"]["m_bsz"] == 2 and "fallback" in rows[1]["figures"]["m_bsz_plan"]
    assert "--resume_states 0" in rows[2]["command"]
    assert not (Path(rows[2]["run_dir"]) / "proj" / "resume").exists()  # weight files only
    report = (out / "report.md").read_text()
    assert "The hardware table" in report and "| 0.1B | L12-D768 |" in report and "| 7B | L32-D4096 |" in report
    t = subprocess.run([sys.executable, str(RUN), "--out", str(out), "--hwtable"], capture_output=True, text=True,
                       env=cpu_env, timeout=120)
    assert t.returncode == 0 and t.stdout.count("\n") == 5, t.stdout + t.stderr
