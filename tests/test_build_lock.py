"""A torch-extension build lock a killed build left behind never makes a run wait in silence.

torch's FileBaton (torch/utils/file_baton.py) waits on `<extensions dir>/<op>/lock` for as long as
the file exists, with no owner and no timeout. accel-tp builds into a folder of its venv's own
(env.extensions_dir) and, before DeepSpeed starts, removes a lock no process holds, or names one
that is held.
"""

from __future__ import annotations

import subprocess
import sys
import time

from accel_tp.compat.torch import clear_stale_build_locks
from accel_tp.env import EXTENSIONS_ENV, extensions_dir, ray_worker_env, worker_env


def test_a_lock_no_process_holds_is_removed_in_one_line(tmp_path, capsys):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    clear_stale_build_locks(str(tmp_path), recheck_s=0.05)
    assert not lock.exists()
    err = capsys.readouterr().err
    assert f"removed a stale torch-extension build lock {lock}" in err and err.count("\n") == 1


def test_a_held_lock_is_named_and_left(tmp_path, capsys):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    # A builder holds its lock file open while it builds (FileBaton), like this process.
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(lock)!r}); import time; time.sleep(60)"])
    try:
        time.sleep(1.0)
        clear_stale_build_locks(str(tmp_path), recheck_s=0.05)
        assert lock.exists()
        err = capsys.readouterr().err
        assert f"waiting for the torch-extension build lock {lock} (held by pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    # A folder the user chose may be shared with other hosts: a lock there is named, never removed.
    clear_stale_build_locks(str(tmp_path), remove=False, recheck_s=0.05)
    assert lock.exists() and "if no build is running, remove that file" in capsys.readouterr().err


def test_extensions_build_in_the_venvs_own_folder():
    assert extensions_dir({}).startswith(sys.prefix) and extensions_dir({EXTENSIONS_ENV: "/x"}) == "/x"
    assert worker_env({})[EXTENSIONS_ENV] == extensions_dir({})
    # A Ray worker takes its own venv's folder, not the driver's path (unless the user set one).
    assert (
        EXTENSIONS_ENV not in ray_worker_env({})
        and ray_worker_env({EXTENSIONS_ENV: "/x"})[EXTENSIONS_ENV] == "/x"
    )
