"""CompileCache: where a rank's artifacts live and what a start reports. (Saving and a fresh node's
cache hits are tested end to end in tests/test_levers_mp.py.)"""

from __future__ import annotations

from accel_tp.compile_cache import CompileCache


def test_one_file_per_rank_under_the_run_folder(tmp_path):
    assert CompileCache(tmp_path, 3).locations["train"] == f"{tmp_path}/compile_cache/rank_00003.bin"
    assert (
        CompileCache("s3://bkt/runs/exp/", 0).locations["train"]
        == "s3://bkt/runs/exp/compile_cache/rank_00000.bin"
    )


def test_a_missing_or_damaged_file_means_compiling(tmp_path):
    cache = CompileCache(tmp_path, 0)
    assert "none loaded for this rank (compiling)" in cache.load()
    (tmp_path / "compile_cache").mkdir()
    (tmp_path / "compile_cache" / "rank_00000.bin").write_bytes(b"not torch's format")
    assert (
        "none loaded for this rank (compiling); " in (msg := cache.load())
        and "rank_00000.bin unreadable" in msg
    )


def test_training_and_evaluation_artifacts_have_files_of_their_own(tmp_path):
    cache = CompileCache(tmp_path, 1)
    assert cache.locations == {
        "train": f"{tmp_path}/compile_cache/rank_00001.bin",
        "eval": f"{tmp_path}/compile_cache/rank_00001.eval.bin",
    }
