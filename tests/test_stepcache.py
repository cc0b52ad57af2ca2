"""runtime.run.stepcache: finished steps published whole under their key and linked into other runs."""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

from runtime.run import stepcache


def _step(root, name="teacher", weights=b"weights"):
    d = root / "steps" / name
    (d / "finetune-1").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(weights)
    (d / "finetune-1" / "last.safetensors").write_bytes(b"ckpt")
    return d


def test_a_published_step_is_linked_whole_into_another_run(tmp_path):
    cache, stored = tmp_path / "shared", {"model_file": "steps/teacher/model.safetensors", "metrics": {"a": 1}}
    stepcache.publish(cache, "k1", _step(tmp_path / "run1"), stored)
    assert sorted(p.name for p in cache.iterdir()) == ["k1"]  # no temporary folder left behind
    other = tmp_path / "run2" / "steps" / "teacher"
    other.mkdir(parents=True)
    (other / "stale.safetensors").write_bytes(b"an interrupted attempt")
    assert stepcache.lookup(cache, "k1", other) == stored
    assert sorted(str(p.relative_to(other)) for p in other.rglob("*")) == [
        "finetune-1", "finetune-1/last.safetensors", "model.safetensors"]
    src = tmp_path / "run1" / "steps" / "teacher" / "model.safetensors"
    assert (other / "model.safetensors").stat().st_ino == src.stat().st_ino  # a link, not a copy


def test_the_first_publication_of_a_key_stays_and_a_missing_or_damaged_one_is_a_miss(tmp_path):
    cache = tmp_path / "shared"
    stepcache.publish(cache, "k", _step(tmp_path / "a", weights=b"first"), {"n": 1})
    stepcache.publish(cache, "k", _step(tmp_path / "b", weights=b"second"), {"n": 2})
    target = tmp_path / "c" / "steps" / "teacher"
    assert stepcache.lookup(cache, "k", target) == {"n": 1}
    assert (target / "model.safetensors").read_bytes() == b"first"
    assert stepcache.lookup(cache, "absent", tmp_path / "d") is None
    (cache / "k" / stepcache.RESULT).write_text("{not json")
    assert stepcache.lookup(cache, "k", tmp_path / "e") is None and not (tmp_path / "e").exists()


def test_a_run_claims_a_step_it_runs_and_releases_it(tmp_path):
    cache = tmp_path / "shared"
    assert stepcache.obtain(cache, "k", tmp_path / "run" / "steps" / "s", print) is None  # to run here
    claim = cache / ".k.claim"
    assert claim.read_text() == f"{os.getpid()} {socket.gethostname()}"
    stepcache.release(cache, "k")
    assert not claim.exists()


def test_a_step_a_live_run_claimed_is_awaited_and_a_dead_runs_claim_taken_over(tmp_path, monkeypatch):
    """Two workers starting a search both wanted the teacher: the second now waits for the first's."""
    monkeypatch.setattr(stepcache, "POLL_SECONDS", 0.05)
    cache, said = tmp_path / "shared", []
    cache.mkdir()
    other = subprocess.Popen(["sleep", "30"])
    try:
        (cache / ".k.claim").write_text(f"{other.pid} {socket.gethostname()}")

        def finish():  # the other run publishes its step, then releases its claim
            time.sleep(0.3)
            stepcache.publish(cache, "k", _step(tmp_path / "other"), {"done": "by the other run"})
            (cache / ".k.claim").unlink()

        threading.Thread(target=finish).start()
        got = stepcache.obtain(cache, "k", tmp_path / "run" / "steps" / "teacher", said.append)
        assert got == {"done": "by the other run"} and len(said) == 1 and "waiting" in said[0]
    finally:
        other.kill()
        other.wait()
    (cache / ".j.claim").write_text(f"{other.pid} {socket.gethostname()}")  # its run is gone now
    assert stepcache.obtain(cache, "j", tmp_path / "run2", said.append) is None
    assert (cache / ".j.claim").read_text().split()[0] == str(os.getpid())
    (cache / ".r.claim").write_text("1 another-machine")  # cannot be checked: run it, without a claim
    assert stepcache.obtain(cache, "r", tmp_path / "run3", said.append) is None
    stepcache.release(cache, "r")
    assert (cache / ".r.claim").read_text() == "1 another-machine" and len(said) == 1
