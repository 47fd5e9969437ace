"""benchmarks/bench_lmeval.py: the export -> lm-eval -> score chain (its parts on any machine; the whole
chain on the CPU, through fla's model code with PyTorch stand-ins, where lm-eval and fla import)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_lmeval  # noqa: E402

sys.path.remove(str(REPO / "benchmarks"))


def _lmeval_importable() -> bool:
    import importlib

    try:
        for m in ("lm_eval", "accelerate", "transformers", "fla.models.rwkv7"):
            importlib.import_module(m)
    except Exception:
        return False
    return True


def test_reads_lm_evals_newest_results_and_its_samples(tmp_path):
    import os
    import time

    d = tmp_path / "lmeval" / "__model__"
    d.mkdir(parents=True)
    old, new = d / "results_2026-12-01T10-00-00.json", d / "results_2026-12-03T10-00-00.json"
    old.write_text(json.dumps({"results": {"rwkv_arith": {"exact_match,reply": 0.5}}}))
    new.write_text(json.dumps({"results": {"rwkv_arith": {"exact_match,reply": 0.25,
                                                          "exact_match_stderr,reply": 0.1}}}))
    t = time.time()
    os.utime(old, (t - 100, t - 100))
    os.utime(new, (t, t))
    (d / "samples_rwkv_arith_2026-12-03T10-00-00.jsonl").write_text(
        "\n".join(json.dumps({"doc": {"question": q}, "filtered_resps": [r]}) for q, r in
                  (("1 + 1 = ?", "1 + 1 = 2"), ("2 + 2 = ?", "2 + 2 = 5"))) + "\n")
    results, path = bench_lmeval.lm_eval_results(tmp_path / "lmeval")
    assert path == new and results["results"]["rwkv_arith"]["exact_match,reply"] == 0.25
    assert bench_lmeval.lm_eval_replies(path, "rwkv_arith") == {"1 + 1 = ?": "1 + 1 = 2", "2 + 2 = ?": "2 + 2 = 5"}
    with pytest.raises(SystemExit, match="no results"):
        bench_lmeval.lm_eval_results(tmp_path / "nothing")
    assert bench_lmeval.device_name("cpu").startswith("CPU ") and "cores" in bench_lmeval.device_name("cpu")


def test_a_char_level_model_is_refused_after_the_export(tmp_path, capsys):
    from rwkvlm.data.charvocab import CharVocab
    from trainkit import perturbed_model

    proj = tmp_path / "proj"
    proj.mkdir()
    vocab = CharVocab(sorted(set("User: 12+7=?\nAssistant")))
    torch.save(perturbed_model(1, 64, vocab.vocab_size).state_dict(), proj / "rwkv-final.pth")
    (proj / "vocab.json").write_text(vocab.to_json())
    rc = bench_lmeval.main(["--model-dir", str(proj), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "char vocabulary" in err and "end-of-text token" in err
    assert (tmp_path / "out" / "hf" / "tokenizer.json").is_file()  # the export itself is fine


@pytest.mark.slow
@pytest.mark.skipif(not _lmeval_importable(), reason="needs lm-eval[hf], transformers and flash-linear-attention")
def test_the_whole_chain_on_the_cpu_scores_a_model(tmp_path, capsys):
    """A random World-vocabulary model (it answers nothing right): lm-eval runs on the export through
    fla's model code on the CPU, and evaluate.py gives the same replies on the same items."""
    from trainkit import perturbed_model

    torch.save(perturbed_model(2, 64).state_dict(), tmp_path / "rwkv-final.pth")  # fla cannot load 1 layer
    out = tmp_path / "out"
    rc = bench_lmeval.main(["--model-dir", str(tmp_path / "rwkv-final.pth"), "--out", str(out), "--device", "cpu",
                            "--n", "8", "--limit", "2", "--tasks", "rwkv_arith"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "bench_lmeval.json").read_text())
    assert [s["step"] for s in doc["steps"]] == ["export", "task", "lm_eval", "evaluate"]
    assert all(s["rc"] == 0 for s in doc["steps"])
    assert doc["lm_eval"]["rwkv_arith"]["exact_match"] == 0.0 and doc["lm_eval"]["rwkv_arith"]["n"] == 2
    assert doc["evaluate_py"]["n"] == 2 and doc["evaluate_py"]["same_replies_as_lm_eval"] == 2
    assert doc["device"].startswith("CPU ") and doc["scored"] == 2 and doc["export"]["vocabulary"] == "world"
