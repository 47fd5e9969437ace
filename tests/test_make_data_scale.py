"""make_data on multi-MB inputs with worker processes: SIGKILL at random moments, the same bytes
as one worker, memory that does not grow with the input or its number of documents (the slow tier)."""
import json
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

import rwkvlm.data.copies as copies
import rwkvlm.data.shuffle as shuffle
import rwkvlm.data.tokenize_jsonl as tokenize_jsonl
from rwkvlm.data.binidx import BinIdx
from trainkit import run_make_data

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = ROOT / "RWKV-v5" / "make_data.py"
FINAL = (".bin", ".idx", ".meta.json")

pytestmark = pytest.mark.slow


def write_corpus(path: Path, mb: float, seed: int = 0) -> int:
    """~mb MB of {"text": ...} lines of a few hundred bytes (English, CJK, digits); returns the lines."""
    rng = random.Random(seed)
    words = ["the", "model", "data", "RWKV", "训练", "数据", "模型", "１２３", "42", "+", "=", "é", "\n", "User:", "Assistant:"]
    limit, size, lines = int(mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < limit:
            line = json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(5, 120)))}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode())
            lines += 1
    return lines


def make_data(cwd, *args, timeout=600):
    return subprocess.run([sys.executable, str(WRAPPER), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def final_files(folder: Path, name: str = "demo") -> dict:
    """{extension: bytes} of the output files under their final names."""
    return {ext: (folder / f"{name}{ext}").read_bytes() for ext in FINAL if (folder / f"{name}{ext}").exists()}


def children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def running(pid: int) -> bool:
    """Whether pid is a live process (a zombie waiting for its reaper is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_sigkill_at_random_moments_leaves_no_partial_output(tmp_path):
    """SIGKILL of make_data (2 workers) at 10 random moments of a run on a 4 MB input (tokenizing,
    writing 20 copies, renaming, reporting): no file under a final name is ever partial, the
    workers die with it, and a re-run writes the same bytes."""
    ref, work = tmp_path / "ref", tmp_path / "work"
    ref.mkdir()
    work.mkdir()
    write_corpus(ref / "demo.jsonl", 4)
    shutil.copy(ref / "demo.jsonl", work / "demo.jsonl")
    args = ["demo.jsonl", 20, 512, "--seed", 3, "--workers", 2]
    r = make_data(ref, *args)
    assert r.returncode == 0, r.stderr
    assert "2 workers" in r.stdout
    run_s = float(re.search(r"^### Done in ([\d.]+) s", r.stdout, re.M).group(1))  # from main's start
    expected = final_files(ref)
    expected[".meta.json"] = expected[".meta.json"].replace(str(ref).encode(), str(work).encode())
    rng = random.Random(20261203)
    seen_workers = 0
    for attempt in range(10):
        proc = subprocess.Popen([sys.executable, str(WRAPPER), *map(str, args)], cwd=work,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().startswith("### Convert")  # main has started
        time.sleep((attempt + rng.random()) / 10 * 1.1 * run_s)  # a random moment in each tenth of the run
        workers = children(proc.pid)
        seen_workers += bool(workers)
        proc.kill()
        proc.communicate()
        for ext, data in final_files(work).items():  # each file there is whole (old or new: the same bytes)
            assert data == expected[ext], (attempt, ext)
        deadline = time.time() + 10
        while any(map(running, workers)) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(map(running, workers)), f"workers {workers} outlived make_data"
        if (work / "demo.bin").exists() or (work / "demo.idx").exists():
            BinIdx(work / "demo")  # what the trainer opens: completes a set a kill left half renamed
            assert final_files(work) == expected
    assert seen_workers >= 1, "no kill while the workers ran"
    r = make_data(work, *args)
    assert r.returncode == 0, r.stderr
    assert final_files(work) == expected
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")], "temporaries left"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder / "big.jsonl", 32, seed=1)
    return folder / "big.jsonl"


def test_workers_write_the_bytes_of_one_worker(tmp_path, corpus):
    """A 32 MB input (31 chunks; its token file past IN_MEMORY_BYTES, so pass 2 reads it through
    the workers): 1, 2 and 3 workers write the same bytes."""
    outs = []
    for workers in (1, 2, 3):
        r = make_data(corpus.parent, corpus.name, 3, 512, "--seed", 9, "--workers", workers, "--out-dir", tmp_path / str(workers))
        assert r.returncode == 0, r.stderr
        assert f"{workers} worker" in r.stdout
        outs.append({ext: (tmp_path / str(workers) / f"big{ext}").read_bytes() for ext in (".bin", ".idx")})
    assert outs[0] == outs[1] == outs[2]
    assert len(outs[0][".bin"]) // 3 > copies.IN_MEMORY_BYTES


class PeakTreeRSS(threading.Thread):
    """The peak over time of the summed VmRSS of a process and its children, sampled every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            total = 0
            for p in [self.pid] + children(self.pid):
                try:
                    with open(f"/proc/{p}/status") as f:
                        total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            self.done.wait(0.02)


def test_memory_does_not_grow_with_the_input(tmp_path, corpus):
    """Peak RSS of make_data and its 2 workers: the 32 MB input and 4 times it differ by < 10%."""
    big = tmp_path / "big4.jsonl"
    with open(big, "wb") as f:
        for _ in range(4):
            f.write(corpus.read_bytes())
    peaks = {}
    for path in (corpus, big):
        proc = subprocess.Popen([sys.executable, str(WRAPPER), str(path), "1", "512", "--seed", "1", "--workers", "2",
                                 "--out-dir", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sampler = PeakTreeRSS(proc.pid)
        sampler.start()
        out, err = proc.communicate(timeout=600)
        sampler.done.set()
        sampler.join()
        assert proc.returncode == 0, err.decode()[-2000:]
        peaks[path.name] = sampler.peak / 1024
    small, large = peaks[corpus.name], peaks[big.name]
    assert abs(large - small) < 0.1 * small, peaks
    assert large < 2048, peaks


def test_memory_does_not_depend_on_the_document_count(tmp_path, monkeypatch):
    """What make_data allocates (Python and numpy, traced by tracemalloc: the same on a loaded
    machine) in a one-worker run of 2 copies of 40,000 and of 400,000 tiny documents: the peaks
    differ by less than 1 MB. Pass 2's bounded sizes are made small, so that both runs go through
    every path (segments put in order through the file of records, the token file read by
    document, the Feistel order): any array of a value per document would show, as the 12 bytes
    a document (4.3 MB here) of the pass 2 before the change did."""
    monkeypatch.setattr(tokenize_jsonl, "CHUNK_BYTES", 1 << 16)  # both inputs in many full chunks
    monkeypatch.setattr(copies, "SEGMENT_DOCS", 4096)
    monkeypatch.setattr(copies, "SCAN_DOCS", 1024)
    monkeypatch.setattr(copies, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(shuffle, "TABLE_DOCS", 1024)
    peaks = {}
    for n in (1000, 40_000, 400_000):  # the first: what is loaded once (tokenizer, imports), untraced
        with open(tmp_path / f"d{n}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(n))
        if n == 1000:
            assert run_make_data(tmp_path, f"d{n}.jsonl", 2, 512, "--seed", 1, "--workers", 1, "--no-progress") == 0
            continue
        tracemalloc.start()
        try:
            assert run_make_data(tmp_path, f"d{n}.jsonl", 2, 512, "--seed", 1, "--workers", 1, "--no-progress") == 0
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert BinIdx(tmp_path / f"d{n}").num_items == 2 * n
    print("peak traced bytes:", peaks)
    assert peaks[400_000] - peaks[40_000] < 1 << 20, peaks
