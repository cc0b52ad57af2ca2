"""runtime.stepcache: finished steps published whole under their key and linked into other runs."""
from __future__ import annotations

from runtime import stepcache


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
