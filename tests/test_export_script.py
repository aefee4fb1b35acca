"""scripts/export_hf.py's input checks and the run config recorded in checkpoints (single process).

The checkpoints here are hand-made folders with the files the checks look at; every check fails
before a process is started or a weight is read. The real export (DeepSpeed gathering the TP shards
of trained tp2 x dp2 runs, ZeRO-1 and ZeRO-2) is tested in tests/test_multiprocess.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from accel_tp.checkpoint import RUN_CONFIG_FILE, LocalCheckpointer, TrainState
from accel_tp.checkpoint.format import (
    DS_TAG,
    MANIFEST_FILE,
    STEP_NAME_PATTERN,
    TRAIN_STATE_FILE,
    model_states_file,
    step_name,
    tmp_name,
)
from accel_tp.cli import main_export as main
from accel_tp.config import load_config
from accel_tp.export import EXPORT_MARKER, inspect_checkpoint
from accel_tp.run_folder import CHECKPOINTS_DIR

from .mp_utils import TINY

TINY_MODEL = "qwen2:4096-128-352-4-4:kv4"  # the fingerprint of TINY's model (default tokenizer)


def fake_checkpoint(
    path: Path, model: str = TINY_MODEL, tp: int = 2, files: int | None = None, bf16: bool = False
) -> Path:
    """A folder with what inspect_checkpoint reads: the train state and the rank files' metadata."""
    (path / DS_TAG).mkdir(parents=True)
    torch.save(TrainState(step=4, model=model, layout=f"tp{tp}xdp2").state_dict(), path / TRAIN_STATE_FILE)
    meta = {
        "module": {},
        "mp_world_size": tp,
        "ds_config": {"tensor_parallel": {"autotp_size": tp}, "bf16": {"enabled": bf16}},
    }
    for r in range(tp if files is None else files):
        torch.save(meta, path / DS_TAG / model_states_file(r))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def export_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_checkpoint_records_the_run_config(tmp_path):
    class Acc:  # save_state stand-in: the config file is written by the checkpointer itself
        is_main_process = True

        def wait_for_everyone(self) -> None:
            pass

        def save_state(self, path: str) -> None:
            (Path(path) / "model.bin").write_bytes(b"x")

    def save(ck: LocalCheckpointer, step: int) -> Path:
        with ck.save(step) as written:
            pass
        return Path(written.location)

    cfg = load_config(TINY, ["train.max_steps=70"])
    out = save(LocalCheckpointer(Acc(), TrainState(), tmp_path, None, run_config=cfg.to_dict()), 3)
    assert load_config(out / RUN_CONFIG_FILE) == cfg
    # Without a run config the folder holds what save_state writes, and the manifest of it.
    assert sorted(
        p.name for p in save(LocalCheckpointer(Acc(), TrainState(), tmp_path, None), 4).iterdir()
    ) == sorted([MANIFEST_FILE, "model.bin"])


def test_inspect_reads_tp_size_and_dtype_without_weights(tmp_path):
    info = inspect_checkpoint(fake_checkpoint(tmp_path / step_name(4), tp=4, bf16=True))
    assert (info.tp_size, info.dtype, info.train_state["step"], info.run_config) == (
        4,
        torch.bfloat16,
        4,
        None,
    )


def test_not_a_checkpoint_names_the_fix(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = export_error(
        capsys, ["--checkpoint", str(empty), "--out", str(tmp_path / "o"), "--config", str(TINY)]
    )
    assert "is not an accel-tp checkpoint" in err and STEP_NAME_PATTERN in err
    # A run folder: the error names its newest checkpoint.
    run = tmp_path / "run"
    for step in (10, 20):
        fake_checkpoint(run / CHECKPOINTS_DIR / step_name(step))
    err = export_error(capsys, ["--checkpoint", str(run), "--out", str(tmp_path / "o")])
    assert f"--checkpoint {run / CHECKPOINTS_DIR / step_name(20)}" in err
    # An unfinished local save, and a checkpoint missing a TP rank's file.
    tmp = fake_checkpoint(tmp_path / tmp_name(step_name(30)))
    assert "unfinished save" in export_error(capsys, ["--checkpoint", str(tmp), "--out", str(tmp_path / "o")])
    part = fake_checkpoint(tmp_path / step_name(40), files=1)
    err = export_error(capsys, ["--checkpoint", str(part), "--out", str(tmp_path / "o")])
    assert "incomplete" in err and model_states_file(1) in err
    assert not (tmp_path / "o").exists()


def test_out_dir_never_deletes_the_users_files(tmp_path, capsys, monkeypatch):
    """The export replaces --out whole: a folder of the user's own files is refused, --overwrite or
    not; only an earlier export (it holds EXPORT_MARKER) may be replaced, and only with --overwrite."""
    ckpt = fake_checkpoint(tmp_path / step_name(4))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        err = export_error(
            capsys, ["--checkpoint", str(ckpt), "--out", str(out), "--config", str(TINY), *extra]
        )
        assert "holds files accel-tp did not write" in err and EXPORT_MARKER in err
    assert (out / "keep.txt").read_text() == "mine"
    # The working directory (".") and the home folder, even with --overwrite.
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    for where in (".", str(work), "~"):
        err = export_error(capsys, ["--checkpoint", str(ckpt), "--out", where, "--overwrite"])
        assert "the working directory, home or the filesystem root" in err
    assert (work / "notes.txt").read_text() == "mine"
    # An earlier export needs --overwrite.
    (out / "keep.txt").unlink()
    (out / EXPORT_MARKER).write_text("")
    err = export_error(capsys, ["--checkpoint", str(ckpt), "--out", str(out), "--config", str(TINY)])
    assert "holds an earlier export" in err and "--overwrite" in err
    # --overwrite never reaches into the checkpoint itself.
    err = export_error(capsys, ["--checkpoint", str(ckpt), "--out", str(tmp_path), "--overwrite"])
    assert "overlaps the checkpoint" in err


def test_recorded_trust_remote_code_is_not_taken_from_the_checkpoint(tmp_path, capsys, cache):
    """Without --config the model comes from the checkpoint's own recorded config: that file must not
    be able to switch on running the model folder's Python code."""
    import yaml

    ckpt = fake_checkpoint(tmp_path / step_name(4))
    recorded = load_config(TINY, [f"data.cache_dir={cache}", "model.trust_remote_code=true"]).to_dict()
    (ckpt / RUN_CONFIG_FILE).write_text(yaml.safe_dump(recorded))
    err = export_error(capsys, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")])
    assert "model.trust_remote_code: true" in err and "--set model.trust_remote_code=true" in err


def test_missing_config_and_other_model(tmp_path, capsys, cache):
    ckpt = fake_checkpoint(tmp_path / step_name(4), model="qwen2:151936-896-4864-24-14:kv2")
    out = str(tmp_path / "hf")
    err = export_error(capsys, ["--checkpoint", str(ckpt), "--out", out])
    assert "does not record its run config" in err and "--config" in err
    err = export_error(
        capsys,
        ["--checkpoint", str(ckpt), "--out", out, "--config", str(TINY), "--set", f"data.cache_dir={cache}"],
    )
    assert "checkpoint of another model (qwen2:151936-896-4864-24-14:kv2)" in err and TINY_MODEL in err
    # The config the checkpoint records is used without --config, and --set applies to it.
    (ckpt / RUN_CONFIG_FILE).write_text(load_config(TINY, [f"data.cache_dir={cache}"]).to_yaml())
    err = export_error(capsys, ["--checkpoint", str(ckpt), "--out", out])
    assert "checkpoint of another model" in err
    err = export_error(capsys, ["--checkpoint", str(ckpt), "--out", out, "--set", "train.learning_rat=1"])
    assert "Did you mean 'learning_rate'" in err
    assert not Path(out).exists()
