"""`grass build` / `grass query` over local files: tiny GPT-2 and Llama models saved with
save_pretrained beside locally trained tokenizers, a jsonl of 300 short documents.

Separate processes where the claim is about them (query after build, SIGKILL and rerun,
torchrun); the other checks call the same entry point in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from grass import cli, hf
from tiny_models import documents, save_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                      os.environ.get("PYTHONPATH", "")])}
# One thread everywhere: GEMM rounding depends on the thread count, and bit-identity is checked
# between stores written by different processes.
FAST = ["--k", "64", "--compressor", "factgrass", "--threads", "1"]
BUILD = ["--batch-size", "8", *FAST]


def _main(args) -> int:
    """cli.main in this process, leaving the test process's thread count as it was."""
    threads = torch.get_num_threads()
    try:
        return cli.main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def _grass(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "grass", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    docs = documents(300)
    out = {"docs": docs, "root": root,
           "gpt2": str(save_lm(root / "gpt2", "gpt2", docs)),
           "llama": str(save_lm(root / "llama", "llama", docs, seed=1)),
           "no_tokenizer": str(save_lm(root / "bare", "gpt2", docs, with_tokenizer=False)),
           "data": _write_jsonl(root / "docs.jsonl", [{"text": d} for d in docs])}
    # The reference index, built in this process with the killed build's settings.
    out["index"] = str(root / "index")
    assert _main(["build", "--model", out["gpt2"], "--data", out["data"], "--out",
                  out["index"], *BUILD]) == 0
    return out


def _snapshot(path):
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(path) for f in names}


def _hits(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_query_in_a_new_process_finds_the_repeated_document(files, tmp_path):
    docs = files["docs"]
    out = tmp_path / "hits.jsonl"
    run = _grass("query", files["index"], "--text", docs[17], "--text", docs[200], "--top", 5,
                 "--out", out)
    assert run.returncode == 0, run.stderr
    assert "query rank" in run.stdout and "wrote 10 hits" in run.stdout
    hits = _hits(out)
    assert [sorted(h) for h in hits] == [["query", "rank", "score", "text", "train"]] * 10
    assert [(h["query"], h["rank"]) for h in hits] == [(q, r) for q in (0, 1) for r in range(5)]
    assert hits[0]["train"] == 17 and hits[5]["train"] == 200
    assert all(h["text"] == docs[h["train"]] for h in hits)
    # The same scores from the Attributor in this process (the index reopened in-process).
    attr, opts, tokenizer, _ = hf.open_index(files["index"], progress=False)
    queries = hf.tokenise(tokenizer, [[docs[17]], [docs[200]]], opts, progress=False)
    values, rows = attr.top_k(queries, 5)
    assert rows.flatten().tolist() == [h["train"] for h in hits]
    torch.testing.assert_close(torch.tensor([h["score"] for h in hits]), values.flatten(),
                               rtol=1e-5, atol=1e-6)


def test_killed_build_resumes_bit_identical(files, tmp_path):
    index = tmp_path / "killed"
    args = [sys.executable, "-m", "grass", "build", "--model", files["gpt2"], "--data",
            files["data"], "--out", str(index), *BUILD]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = index / "store" / "progress"
    deadline = time.monotonic() + 180
    while not (progress.is_dir() and any(progress.iterdir())) and proc.poll() is None:
        assert time.monotonic() < deadline, "the build wrote no rows in 180 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    assert not (index / "store" / "arrays" / "efim.rows.json").exists()
    assert _main(["build", "--model", files["gpt2"], "--data", files["data"], "--out", index,
                  *BUILD]) == 0
    want, got = _snapshot(files["index"]), _snapshot(index)
    stored = [k for k in want if not k.startswith(os.path.join("store", "progress"))]
    assert "store/rows.bin" in stored and any(k.startswith("store/arrays/efim") for k in stored)
    for key in stored:
        if key != "grass.json":
            assert got[key] == want[key], key


def test_llama_prompt_completion_data_queries(files, tmp_path, capsys):
    docs = files["docs"]
    records = [{"prompt": " ".join(d.split()[:3]), "answer": " ".join(d.split()[3:])}
               for d in docs]
    data = _write_jsonl(tmp_path / "pc.jsonl", records)
    index = str(tmp_path / "index")
    assert _main(["build", "--model", files["llama"], "--data", data, "--out", index,
                     "--prompt-field", "prompt", "--completion-field", "answer", "--k", "64",
                     "--compressor", "logra", "--batch-size", "16", "--threads", "1"]) == 0
    queries = _write_jsonl(tmp_path / "q.jsonl", [records[i] for i in (3, 150, 299)])
    hits_path = tmp_path / "hits.jsonl"
    assert _main(["query", index, "--data", queries, "--top", "3", "--unit-normalize",
                     "--out", str(hits_path)]) == 0
    hits = _hits(hits_path)
    assert [h["train"] for h in hits if h["rank"] == 0] == [3, 150, 299]
    assert all(h["score"] <= 1 + 1e-5 for h in hits)
    assert [h["score"] for h in hits if h["rank"] == 0] == pytest.approx([1.0] * 3, abs=1e-4)
    assert hits[0]["text"] == records[3]["prompt"] + "\n" + records[3]["answer"]
    assert _main(["query", index, "--data", queries, "--aggregate", "mean", "--top", "4",
                     "--out", str(hits_path)]) == 0
    mean = _hits(hits_path)
    assert [h["query"] for h in mean] == [0] * 4 and [h["rank"] for h in mean] == [0, 1, 2, 3]
    assert "query rank" in capsys.readouterr().out


def _fails(capsys, args, message):
    assert _main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_bad_inputs_are_named_and_nothing_is_written(files, tmp_path, capsys):
    before = _snapshot(files["index"])
    root = files["root"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fresh = tmp_path / "fresh"
    _fails(capsys, ["build", "--model", files["no_tokenizer"], "--data", files["data"], "--out",
                    fresh], "has no tokenizer")
    _fails(capsys, ["build", "--model", files["gpt2"], "--data", files["data"], "--out",
                    files["index"], "--text-field", "body", *FAST],
           "record 0 has no text field 'body' (it has ['text'])")
    _fails(capsys, ["build", "--model", files["gpt2"], "--data", empty, "--out", fresh],
           "holds no documents")
    _fails(capsys, ["build", "--model", files["gpt2"], "--data", files["data"], "--out",
                    files["index"], "--batch-size", "8", "--k", "32"],
           "k: index has 64, requested 32")
    assert not fresh.exists()
    hits = tmp_path / "hits.jsonl"
    _fails(capsys, ["query", files["index"], "--model", files["llama"], "--text", "w1 w2",
                    "--out", hits], "built with another model or configuration")
    _fails(capsys, ["query", root / "nowhere", "--text", "w1"], "is not a grass index")
    assert not hits.exists()
    assert _snapshot(files["index"]) == before


def test_changed_data_file_is_refused(files, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "few.jsonl", [{"text": d} for d in files["docs"][:20]])
    index = tmp_path / "few"
    assert _main(["build", "--model", files["gpt2"], "--data", data, "--out", str(index),
                     *FAST]) == 0
    with open(data, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "w1 w2 w3"}) + "\n")
    before = _snapshot(index)
    _fails(capsys, ["query", index, "--text", "w1 w2"], "is missing or changed since the build")
    _fails(capsys, ["build", "--model", files["gpt2"], "--data", data, "--out", index, *FAST],
           "data_sha256: index has")
    assert _snapshot(index) == before


def test_other_data_formats(files, tmp_path):
    import datasets

    docs = files["docs"][:12]
    txt = tmp_path / "docs.txt"
    txt.write_text("\n".join(docs) + "\n")
    as_json = tmp_path / "docs.json"
    as_json.write_text(json.dumps([{"text": d} for d in docs]))
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(folder))
    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(parquet))
    for path in (txt, as_json, folder, parquet):
        assert [r["text"] for r in hf.read_documents(path)] == docs, path
    csv = tmp_path / "docs.csv"
    csv.write_text("text\nw1 w2\n")
    with pytest.raises(ValueError, match="must be a .jsonl, .json, .parquet or .txt file"):
        hf.read_documents(csv)


def test_build_under_torchrun_matches_one_process(files, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip(f"torchrun is not installed beside {sys.executable}")
    index = tmp_path / "ranks"
    run = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "grass", "build", "--model",
         files["gpt2"], "--data", files["data"], "--out", str(index), *BUILD],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    want, got = _snapshot(files["index"]), _snapshot(index)
    assert sorted(k for k in got if k.startswith("store/progress")) == [
        "store/progress/rank0.json", "store/progress/rank1.json"]
    for key in ("store/rows.bin", "store/manifest.json"):
        assert got[key] == want[key], key
