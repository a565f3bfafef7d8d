"""Checkpoints written off the server thread (ps.checkpoint.CheckpointWriter): the newest snapshot wins, a
failed write neither stops training nor goes unreported, and stop() leaves the last state on disk."""
import errno
import os
import re
import threading

import numpy as np
import pytest

from ps import ParameterClient, ParameterServer
from ps import checkpoint as ckpt

pytestmark = pytest.mark.timeout(120)


def snap(v, n=8):
    return {"weights": np.full(n, v, np.float32)}, {"version": v, "mode": "async"}


def test_writer_keeps_the_newest_snapshot_when_the_disk_is_slow(tmp_path):
    """While version 1 is being written, 2 then 3 arrive: 2 is dropped (counted), 3 is written after 1."""
    entered, release = threading.Event(), threading.Event()

    def slow_first(directory, arrays, meta, keep):
        if meta["version"] == 1:
            entered.set()
            assert release.wait(30)
        return ckpt.save(directory, arrays, meta, keep)

    w = ckpt.CheckpointWriter(str(tmp_path), save_fn=slow_first)
    w.submit(*snap(1))
    assert entered.wait(30)
    w.submit(*snap(2))
    w.submit(*snap(3))
    assert w.stats()["skipped"] == 1 and w.stats()["written"] == 0
    release.set()
    path = w.flush(30)
    assert path.endswith("ckpt-000000000003.npz")
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000000001.npz", "ckpt-000000000003.npz"]
    arrays, meta = ckpt.load(path)
    assert meta["version"] == 3 and np.all(arrays["weights"] == 3)
    assert w.stats() == {"written": 2, "skipped": 1, "errors": 0, "last_path": path, "last_error": None}
    w.close(10)
    with pytest.raises(RuntimeError, match="closed"):
        w.submit(*snap(4))


def test_flush_times_out_on_a_stuck_disk_and_raises_the_last_failure(tmp_path):
    stuck = threading.Event()

    def never_done(directory, arrays, meta, keep):
        assert stuck.wait(30)
        raise OSError(errno.ENOSPC, "No space left on device")

    w = ckpt.CheckpointWriter(str(tmp_path), save_fn=never_done)
    w.submit(*snap(1))
    with pytest.raises(TimeoutError, match="still busy"):
        w.flush(0.2)
    stuck.set()
    with pytest.raises(OSError, match="No space left"):
        w.flush(30)
    assert w.stats()["errors"] == 1 and os.listdir(tmp_path) == []
    w.close(10)


def test_a_schedule_keeps_its_directory_locked_while_its_writer_still_writes(tmp_path, monkeypatch):
    """close() that times out on a stuck disk keeps the lock: no other server may take the directory mid-write."""
    stuck = threading.Event()

    def slow_save(directory, arrays, meta, keep=3):
        assert stuck.wait(30)
        return real(directory, arrays, meta, keep)
    real = ckpt.save
    monkeypatch.setattr(ckpt, "save", slow_save)
    d = str(tmp_path / "ck")
    schedule = ckpt.CheckpointSchedule(d, every=1)
    schedule.start(0)
    schedule.submit(*snap(1))
    with pytest.raises(TimeoutError, match="did not finish"):
        schedule.close(0.2)
    with pytest.raises(ValueError, match="in use by another running parameter server"):
        ckpt.DirectoryLock(d)
    stuck.set()
    schedule.close(30)
    ckpt.DirectoryLock(d).release()                            # free once the write is done
    assert ckpt.load(ckpt.latest(d))[1]["version"] == 1


class FlakyDisk:
    """The real save, except that the writes named in ``fail`` raise ENOSPC (a full disk) first."""

    def __init__(self, fail):
        self.fail, self.calls = set(fail), 0
        self.real = ckpt.save

    def __call__(self, directory, arrays, meta, keep=3):
        self.calls += 1
        if self.calls in self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(directory, arrays, meta, keep)


def push_n(cfg, n, worker_id=0):
    with ParameterClient(cfg, worker_id=worker_id, timeout=10) as c:
        for _ in range(n):
            c.push(np.ones(16, np.float32), batch_size=4)
        return c.pull()


def test_a_failed_write_does_not_stop_training_and_a_later_one_recovers(tmp_path, monkeypatch):
    disk = FlakyDisk(fail={1})
    monkeypatch.setattr(ckpt, "save", disk)
    d = str(tmp_path / "ck")
    s = ParameterServer(np.zeros(16, np.float32), mode="async", num_workers=1, learning_rate=0.5,
                        checkpoint_dir=d, checkpoint_every=1, progress=False).start()
    try:
        version, w = push_n(s.client_config(), 20)
        assert version == 20 and np.all(w == -10.0)          # every push applied, the failure notwithstanding
        assert s.running and "error" not in s.stats()
    finally:
        s.stop()
    stats = s.stats()["checkpoint"]
    assert stats["errors"] == 1 and "No space left" in stats["last_error"] and stats["written"] >= 1
    arrays, meta = ckpt.load(ckpt.latest(d))
    assert meta["version"] == 20 and np.all(arrays["weights"] == -10.0)


def test_stop_says_when_the_last_checkpoint_could_not_be_written(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "save", FlakyDisk(fail=range(1, 1000)))
    d = str(tmp_path / "ck")
    s = ParameterServer(np.zeros(16, np.float32), mode="async", num_workers=1, checkpoint_dir=d,
                        checkpoint_every=5, progress=False).start()
    push_n(s.client_config(), 7)
    with pytest.raises(ckpt.CheckpointNotWritten,
                       match="last checkpoint to .*ck.* was not written.*No space left.*resume would start from no"):
        s.stop()
    assert not s.running and s.stats()["checkpoint"]["errors"] >= 2 and ckpt.latest(d) is None
    assert np.allclose(s.weights(), -0.7)           # stopped, the 7 updates readable: a trainer returns them


def test_checkpoint_dir_that_is_a_file_is_refused_before_anything_starts(tmp_path):
    f = tmp_path / "not-a-dir"
    f.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="not-a-dir.*not a directory"):
        ParameterServer(np.zeros(4, np.float32), checkpoint_dir=str(f), progress=False)
    assert f.read_bytes() == b"keep me"


def test_save_checkpoint_waits_for_the_disk_and_needs_a_directory(tmp_path):
    with ParameterServer(np.zeros(16, np.float32), num_workers=1, learning_rate=1.0, checkpoint_dir=str(tmp_path),
                         progress=False) as s:
        push_n(s.client_config(), 3)
        path = s.save_checkpoint()
        assert ckpt.load(path)[1]["version"] == 3                  # on disk when the call returns
    with ParameterServer(np.zeros(16, np.float32), progress=False) as s:
        with pytest.raises(ValueError, match="no checkpoint_dir"):
            s.save_checkpoint()


@pytest.mark.parametrize("kw,message", [
    (dict(checkpoint_every=0), "checkpoint_every must be an integer >= 1, got 0"),
    (dict(checkpoint_every=2.5), "checkpoint_every must be an integer >= 1, got 2.5"),
    (dict(checkpoint_seconds=float("nan")), "checkpoint_seconds must be a positive number of seconds, got nan"),
    (dict(checkpoint_seconds=-1), "checkpoint_seconds must be a positive number of seconds, got -1"),
])
def test_a_schedule_that_would_never_or_always_fire_is_refused(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        ParameterServer(np.zeros(4, np.float32), checkpoint_dir=str(tmp_path / "ck"), progress=False, **kw)


@pytest.mark.parametrize("kw", [dict(checkpoint_every=5), dict(checkpoint_seconds=1.0), dict(resume=True)])
def test_checkpoint_settings_without_a_directory_are_refused(kw):
    (name, value), = kw.items()
    with pytest.raises(ValueError, match=f"{name}={value!r} needs checkpoint_dir"):
        ParameterServer(np.zeros(4, np.float32), progress=False, **kw)


def test_a_directory_that_cannot_be_written_is_refused_when_the_server_is_built(tmp_path):
    """Not at the first checkpoint (logged) or at stop: a long run would learn at its end that it has none."""
    f = tmp_path / "a-file"
    f.write_bytes(b"keep me")
    with pytest.raises(ValueError, match=r"checkpoint_dir '.*a-file/ck' cannot be written: .*Not a directory"):
        ParameterServer(np.zeros(4, np.float32), checkpoint_dir=str(f / "ck"), progress=False)
    assert f.read_bytes() == b"keep me"


def test_one_server_per_checkpoint_directory(tmp_path):
    """A second server in a directory in use would prune the first one's checkpoints and mix its own among them
    (a resume then takes whichever version is higher): it is refused at start, the first one's files are kept,
    and the directory is free again once the first stops."""
    d = str(tmp_path / "ck")
    first = ParameterServer(np.zeros(16, np.float32), num_workers=1, learning_rate=1.0, checkpoint_dir=d,
                            checkpoint_every=1, progress=False).start()
    try:
        push_n(first.client_config(), 3)
        first.save_checkpoint()
        kept = sorted(os.listdir(d))
        for resume in (True, False):       # not told to pass resume=True: the directory is another run's
            with pytest.raises(ValueError, match=f"'{d}' is in use by another running parameter server "
                                                 f"\\(process {os.getpid()}\\)"):
                ParameterServer(np.ones(16, np.float32), num_workers=1, checkpoint_dir=d, resume=resume,
                                progress=False).start()
        assert sorted(os.listdir(d)) == kept
    finally:
        first.stop()
    with ParameterServer(np.ones(16, np.float32), num_workers=1, checkpoint_dir=d, resume=True,
                         progress=False) as again:
        assert again.version == 3


def test_a_killed_servers_lock_and_partial_write_do_not_outlive_it(tmp_path):
    """flock dies with its process; the temporary file of a write cut short is removed by the next server."""
    import subprocess
    import sys

    d = tmp_path / "ck"
    d.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ps.checkpoint import DirectoryLock; "
                               f"DirectoryLock({str(d)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"in use by another running parameter server \\(process {holder.pid}\\)"):
            ckpt.DirectoryLock(str(d))
    finally:
        holder.kill()
        holder.wait(30)
    (d / ".ckpt-abc123.tmp").write_bytes(b"half a checkpoint")
    with ParameterServer(np.zeros(4, np.float32), checkpoint_dir=str(d), progress=False):
        assert not (d / ".ckpt-abc123.tmp").exists()


def test_a_resumed_server_names_the_checkpoint_it_resumed_from_when_its_last_one_fails(tmp_path, monkeypatch):
    """The message said 'a resume would start from no checkpoint' when only this server's writes had failed:
    the checkpoint it resumed from is still there, and is where a resume would start."""
    d = str(tmp_path / "ck")
    first = ParameterServer(np.zeros(16, np.float32), mode="async", num_workers=1, checkpoint_dir=d,
                            checkpoint_every=100, progress=False).start()
    push_n(first.client_config(), 7)
    first.stop()
    kept = ckpt.latest(d)
    monkeypatch.setattr(ckpt, "save", FlakyDisk(fail=range(1, 1000)))
    again = ParameterServer(np.zeros(16, np.float32), mode="async", num_workers=1, checkpoint_dir=d,
                            checkpoint_every=100, progress=False, resume=True).start()
    push_n(again.client_config(), 3)
    with pytest.raises(ckpt.CheckpointNotWritten, match=f"a resume would start from {re.escape(kept)}$"):
        again.stop()


def test_a_resume_under_another_optimizer_is_refused_by_name(tmp_path):
    """As another mode is: a run of momentum or adam resumed an sgd run's checkpoint with 'optimizer state lacks
    [...]', and sgd resumed an adam run's, dropping its state, without a word. The files are kept."""
    d = str(tmp_path / "ck")
    with ParameterServer(np.zeros(16, np.float32), num_workers=1, optimizer="adam", checkpoint_dir=d,
                         checkpoint_every=1, progress=False) as first:
        push_n(first.client_config(), 3)
        first.save_checkpoint()
    kept = sorted(os.listdir(d))
    for other in ("sgd", "momentum"):
        with pytest.raises(ValueError, match=r"cannot resume from .*ckpt-0+3\.npz: it was made by an "
                                             rf"optimizer='adam' run; this run's optimizer is '{other}'"):
            ParameterServer(np.zeros(16, np.float32), num_workers=1, optimizer=other, checkpoint_dir=d,
                            resume=True, progress=False).start()
        assert sorted(os.listdir(d)) == kept
    with ParameterServer(np.zeros(16, np.float32), num_workers=1, optimizer="adam", checkpoint_dir=d,
                         resume=True, progress=False) as again:
        assert again.version == 3
    # nesterov and momentum share one optimizer class and its state: the rule's name tells them apart
    d2 = str(tmp_path / "ck2")
    with ParameterServer(np.zeros(16, np.float32), num_workers=1, optimizer="nesterov", checkpoint_dir=d2,
                         checkpoint_every=1, progress=False) as first:
        push_n(first.client_config(), 2)
        first.save_checkpoint()
    with pytest.raises(ValueError, match="made by an optimizer='nesterov' run; this run's optimizer is 'momentum'"):
        ParameterServer(np.zeros(16, np.float32), num_workers=1, optimizer="momentum", checkpoint_dir=d2,
                        resume=True, progress=False).start()


def test_resume_in_a_directory_without_checkpoints_is_warned_about(tmp_path, caplog):
    """A mistyped checkpointDir with resume=True started from the initial weights without a word."""
    import logging

    with caplog.at_level(logging.WARNING, logger="ps.server"):
        with ParameterServer(np.zeros(4, np.float32), checkpoint_dir=str(tmp_path / "typo"), resume=True,
                             progress=False) as s:
            assert s.resumed_from is None
    assert f"resume=True, but the checkpoint directory '{tmp_path / 'typo'}' holds no checkpoint" in caplog.text
