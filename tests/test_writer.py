"""keras_ema.writer: a run's files written in order by a background thread."""

import errno
import os
import threading
import time

import keras
import numpy as np
import pytest

from keras_ema import files as _files
from keras_ema import writer as _writer

pytestmark = pytest.mark.all_backends


def test_without_a_writer_jobs_run_at_once():
    done = []
    assert _writer.active() is None
    _writer.submit(done.append, 1)
    assert done == [1]
    _writer.drain()  # nothing to wait for


def test_jobs_run_in_order_in_another_thread_and_all_before_exit():
    done, threads = [], set()

    def job(i):
        time.sleep(0.01 * (i % 3))
        threads.add(threading.current_thread())
        done.append(i)

    with _writer.BackgroundWriter() as writer:
        assert _writer.active() is writer
        for i in range(10):
            _writer.submit(job, i)
        # Another thread sees no writer: its jobs run at once.
        other = threading.Thread(target=lambda: _writer.submit(done.append, "other"))
        other.start()
        other.join()
    assert done.count("other") == 1
    assert [i for i in done if i != "other"] == list(range(10))
    assert threads and threading.current_thread() not in threads
    assert _writer.active() is None


def test_drain_waits_for_the_jobs():
    gate, done = threading.Event(), []
    with _writer.BackgroundWriter() as writer:
        writer.submit(gate.wait, 60)
        writer.submit(done.append, "written")
        assert done == []
        gate.set()
        _writer.drain()
        assert done == ["written"]


def test_a_failed_job_stops_the_writer_and_is_raised_on_the_training_thread():
    done = []

    def full_disk(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    with pytest.raises(OSError) as info:
        with _writer.BackgroundWriter() as writer:
            writer.submit(done.append, "before")
            writer.submit(full_disk, "/run/a.weights.h5")
            writer.submit(done.append, "commit")  # dropped: follows a failure
            while writer._error is None:
                time.sleep(0.01)
            # The next submit (the next epoch end) raises it, and again.
            for _ in range(2):
                with pytest.raises(OSError):
                    writer.submit(done.append, "next epoch")
        # ...and leaving the context (the end of training) raises it too.
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, "/run/a.weights.h5")
    assert done == ["before"]


def test_the_error_is_raised_at_exit_in_place_of_another_error():
    def fail():
        raise OSError(errno.ENOSPC, "No space left on device", "/run/x")

    with pytest.raises(OSError, match="No space left"):
        with _writer.BackgroundWriter() as writer:
            writer.submit(fail)
            writer._jobs.join()
            raise RuntimeError("stopped by the failed write")


def test_an_interrupt_stays_an_interrupt_and_the_jobs_finish():
    gate, done = threading.Event(), []
    with pytest.raises(KeyboardInterrupt):
        with _writer.BackgroundWriter() as writer:
            writer.submit(gate.wait, 60)
            writer.submit(done.append, "written")
            threading.Timer(0.2, gate.set).start()
            raise KeyboardInterrupt("SIGTERM")
    assert done == ["written"]


def _model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(),
                              keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(momentum=0.9), loss="mse")
    model.fit(np.ones((8, 3)), np.ones((8, 2)), epochs=1, verbose=0)
    return model


def _weights_file(model, path, include_optimizer=True):
    _files.write_weights(model, path, include_optimizer)
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("include_optimizer", [True, False])
def test_weights_from_a_host_copy_are_the_file_written_in_place(tmp_path,
                                                                 include_optimizer):
    model = _model()
    expected = _weights_file(model, str(tmp_path / "a.weights.h5"), include_optimizer)
    gate = threading.Event()
    path = str(tmp_path / "b.weights.h5")
    with _writer.BackgroundWriter() as writer:
        writer.submit(gate.wait, 60)  # the writer is busy meanwhile
        _writer.save_weights(model, path, include_optimizer)
        waiting = os.path.exists(path)
        # The next epoch trains before the file is written: the copy holds.
        model.fit(np.zeros((8, 3)), np.full((8, 2), 5.0), epochs=1, verbose=0)
        gate.set()
    assert not waiting
    with open(path, "rb") as f:
        assert f.read() == expected
    assert sorted(os.listdir(tmp_path)) == ["a.weights.h5", "b.weights.h5"]


def test_ema_files_from_host_copies_match_and_duplicates_are_links(tmp_path):
    from keras_ema import MultiEMA

    model = _model()
    ema = MultiEMA((0.5, 0.9), period=1, verbose=0)
    model.fit(np.ones((8, 3)), np.ones((8, 2)), epochs=2, batch_size=2,
              verbose=0, callbacks=[ema])
    in_place = str(tmp_path / "in_place")
    ema.save_weights(0.9, os.path.join(in_place, "ema.weights.h5"))
    ema.save_weights(0.5, os.path.join(in_place, "other.weights.h5"))
    ema._written.clear()
    gate = threading.Event()
    with _writer.BackgroundWriter() as writer:
        writer.submit(gate.wait, 60)
        ema.save_weights(0.9, str(tmp_path / "best_accuracy.weights.h5"))
        ema.save_weights(0.9, str(tmp_path / "best_loss.weights.h5"))
        ema.save_weights(0.5, str(tmp_path / "other.weights.h5"))
        waiting = os.path.exists(tmp_path / "best_accuracy.weights.h5")
        before = [keras.ops.convert_to_numpy(s) for s in ema._shadows]
        # The live weights and the EMAs (compiled update) move on before
        # the files are written; the files keep the values saved.
        model.fit(np.zeros((8, 3)), np.full((8, 2), 5.0), epochs=1,
                  batch_size=2, verbose=0, callbacks=[ema])
        moved = [keras.ops.convert_to_numpy(s) for s in ema._shadows]
        gate.set()
    assert max(np.abs(a - b).max() for a, b in zip(before, moved)) > 1e-3
    assert not waiting
    with open(os.path.join(in_place, "ema.weights.h5"), "rb") as f:
        expected = f.read()
    for name in ("best_accuracy", "best_loss"):
        with open(tmp_path / f"{name}.weights.h5", "rb") as f:
            assert f.read() == expected, name
    assert (os.stat(tmp_path / "best_accuracy.weights.h5").st_ino
            == os.stat(tmp_path / "best_loss.weights.h5").st_ino)
    with open(tmp_path / "other.weights.h5", "rb") as f, open(
            os.path.join(in_place, "other.weights.h5"), "rb") as g:
        assert f.read() == g.read()
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_state_file_is_written_by_the_writer_from_a_copy(tmp_path):
    from keras_ema import MultiEMA
    from keras_ema import state_file

    model = _model()
    ema = MultiEMA((0.5,), period=1, verbose=0)
    model.fit(np.ones((8, 3)), np.ones((8, 2)), epochs=1, batch_size=2,
              verbose=0, callbacks=[ema])
    ema.backup_dir = str(tmp_path)
    expected = ema.get_state()["shadows"]
    gate = threading.Event()
    with _writer.BackgroundWriter() as writer:
        writer.submit(gate.wait, 60)
        ema._save_backup()
        waiting = state_file.state_files(str(tmp_path))
        for shadow in ema._shadows:  # the EMAs move on before it is written
            shadow.assign(np.zeros(shadow.shape, shadow.dtype))
        gate.set()
    assert waiting == []
    saved = state_file.read_state_file(state_file.state_path(str(tmp_path), ema.step))
    for a, b in zip(saved["shadows"], expected):
        np.testing.assert_array_equal(a, b)
