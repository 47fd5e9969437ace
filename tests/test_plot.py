"""plot_loss: reading the trainer's logs and writing loss.png."""
import math

import numpy as np
import pytest

from rwkvlm.errors import UserError
from rwkvlm.infer.plot import main, plot_run, read_loss_csv, read_train_log, smooth, tokens_per_mini_epoch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCH_STEPS = 20
TOKENS_PER_STEP = 4 * 64


def _write_logs(proj, steps=95, resume_at=50, redo=10):
    """loss_log.csv with steps resume_at-redo+1..resume_at written twice (a resume), and train_log.txt."""
    rng = np.random.default_rng(0)
    rows, final = [], {}

    def row(s):
        loss = 5 * math.exp(-s / 30) + 2 + 0.05 * rng.standard_normal()
        final[s] = round(loss, 6)
        return f"{s},{s * TOKENS_PER_STEP},{loss:.6f},{1e-3 * (1 - s / 200):.8g},1.5,{1.7e9 + s:.3f}"

    for s in range(1, steps + 1):
        rows.append(row(s))
        if s == resume_at:
            rows.extend(row(s2) for s2 in range(resume_at - redo + 1, resume_at + 1))
    proj.mkdir(parents=True, exist_ok=True)
    (proj / "loss_log.csv").write_text("step,tokens,loss,lr,kt_s,time\n" + "\n".join(rows) + "\n")
    lines = []
    for e in range(steps // EPOCH_STEPS):
        mean = np.mean([final[s] for s in range(e * EPOCH_STEPS + 1, (e + 1) * EPOCH_STEPS + 1)])
        lines.append(f"{e} {mean:.6f} {math.exp(mean):.4f} 0.00080000 2026-11-28 01:02:0{e}.123456 {e}")
    (proj / "train_log.txt").write_text("\n".join(lines) + "\n")
    return final


def test_reading_logs_keeps_the_last_row_of_a_step(tmp_path):
    final = _write_logs(tmp_path)
    log = read_loss_csv(tmp_path / "loss_log.csv")
    assert list(log.step) == list(range(1, 96))
    assert np.allclose(log.loss, [final[s] for s in range(1, 96)])
    assert log.tokens[9] == 10 * TOKENS_PER_STEP
    ep = read_train_log(tmp_path / "train_log.txt")
    assert list(ep.epoch) == [0, 1, 2, 3] and ep.when[0] == "2026-11-28 01:02:00.123456"
    assert tokens_per_mini_epoch(tmp_path) is None
    (tmp_path / "train_config.json").write_text('{"tokens_per_mini_epoch": %d}' % (EPOCH_STEPS * TOKENS_PER_STEP))
    assert tokens_per_mini_epoch(tmp_path) == EPOCH_STEPS * TOKENS_PER_STEP
    assert np.allclose(smooth(np.ones(10), 3), 1.0)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    _write_logs(tmp_path)
    with open(tmp_path / "loss_log.csv", "a") as f:
        f.write("96,24")  # a torn last line of a killed run is skipped
    out = plot_run(tmp_path)
    assert out == tmp_path / "loss.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_plot_from_train_log_only_and_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _write_logs(tmp_path)
    (tmp_path / "loss_log.csv").unlink()
    assert main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG_MAGIC
    assert "x.png" in capsys.readouterr().out


def test_no_logs_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no training logs"):
        plot_run(tmp_path)
    with pytest.raises(UserError, match="no such PROJ_DIR"):
        plot_run(tmp_path / "missing")
