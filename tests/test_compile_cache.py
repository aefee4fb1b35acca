"""CompileCache: where a rank's artifacts live and what a start reports. (Saving and a fresh node's
cache hits are tested end to end in tests/test_levers_mp.py.)"""

from __future__ import annotations

from accel_tp.compile_cache import CompileCache, rank_cache_file
from accel_tp.run_folder import COMPILE_CACHE_DIR


def test_rank_files_are_zero_padded_and_sort_by_rank():
    # The on-disk names themselves, spelled out: what a saved run folder holds.
    assert [rank_cache_file(3), rank_cache_file(3, "eval")] == ["rank_00003.bin", "rank_00003.eval.bin"]


def test_one_file_per_rank_under_the_run_folder(tmp_path):
    assert (
        CompileCache(tmp_path, 3).locations["train"] == f"{tmp_path}/{COMPILE_CACHE_DIR}/{rank_cache_file(3)}"
    )
    assert (
        CompileCache("s3://bkt/runs/exp/", 0).locations["train"]
        == f"s3://bkt/runs/exp/{COMPILE_CACHE_DIR}/{rank_cache_file(0)}"
    )


def test_a_missing_or_damaged_file_means_compiling(tmp_path):
    cache = CompileCache(tmp_path, 0)
    assert "none loaded for this rank (compiling)" in cache.load()
    (tmp_path / COMPILE_CACHE_DIR).mkdir()
    (tmp_path / COMPILE_CACHE_DIR / rank_cache_file(0)).write_bytes(b"not torch's format")
    assert (
        "none loaded for this rank (compiling); " in (msg := cache.load())
        and f"{rank_cache_file(0)} unreadable" in msg
    )


def test_training_and_evaluation_artifacts_have_files_of_their_own(tmp_path):
    cache = CompileCache(tmp_path, 1)
    assert cache.locations == {
        "train": f"{tmp_path}/{COMPILE_CACHE_DIR}/{rank_cache_file(1)}",
        "eval": f"{tmp_path}/{COMPILE_CACHE_DIR}/{rank_cache_file(1, 'eval')}",
    }
