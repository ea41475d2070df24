"""BackupAndRestore whose backup survives a kill at any instant, and damage."""

import glob
import os
import re

import keras

from keras_ema import writer
from keras_ema.messages import print_msg
from zoo import _keras_private
from zoo.run import run_dir

_WEIGHTS_NAME = re.compile(r"^epoch_(\d+)\.weights\.h5$")


# Keras' BackupAndRestore internals this subclass relies on are named in
# `zoo._keras_private.BackupAndRestore` (and `resume_at`).


class AtomicBackupAndRestore(_keras_private.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` with kill-safe, damage-tolerant files.

    Keras' callback overwrites `latest.weights.h5` in place and writes the
    epoch to a second file afterwards, so a kill in between resumes the
    weights of one epoch with the epoch number of another. Here each backup
    writes `epoch_<e>.weights.h5` under a temporary name, renames it, and
    only then replaces `training_metadata.json`, which names it and the
    previous epoch's file, newest first; older weights are removed last.
    Whatever instant the process dies at, the metadata names complete
    weights files of the epochs it records.

    Two epochs are kept so that a damaged file (a disk error, a careless
    copy) costs one epoch instead of the run. On resume, the newest epoch
    whose weights load (and, with `ema_state`, whose MultiEMA state at that
    epoch's optimizer step reads back whole) is restored, else the older
    one; if the metadata is damaged it is rebuilt from the
    `epoch_<e>.weights.h5` files present. With `history_path`, a copy of the
    run's `history.csv` is kept in the backup, and the rows a resumed run
    keeps are checked and, if damaged, restored from that copy. When
    nothing can be restored, `zoo.run.run_dir.RunDirError` names the damaged
    files and says to remove the backup.

    Args:
        backup_dir: str. Where the backup lives; removed when training ends
            (unless `delete_checkpoint=False`).
        delete_checkpoint: bool. Whether to remove the backup at the end of
            training. Defaults to `True`.
        ema_state: bool. Whether a `keras_ema.MultiEMA` keeps its state in
            the same `backup_dir`; an epoch is then restored only with its
            EMA state. Defaults to `False`.
        history_path: str or `None`. The run's `history.csv`, copied into the
            backup at each epoch end and checked on resume. Defaults to
            `None`.
    """

    def __init__(self, backup_dir, delete_checkpoint=True, ema_state=False,
                 history_path=None):
        super().__init__(backup_dir, save_freq="epoch",
                         delete_checkpoint=delete_checkpoint)
        self.ema_state = ema_state
        self.history_path = history_path

    def on_train_begin(self, logs=None):
        self.load_backup()

    def on_train_end(self, logs=None):
        writer.drain()  # the backup's files whole before it may be removed
        super().on_train_end(logs)

    def _history_copy(self):
        return os.path.join(self.backup_dir, "history.csv")

    def _entries(self):
        """`[{"epoch", "weights"}]` of the backups, newest first; `[]` if damaged."""
        path = self.metadata_path
        if not os.path.exists(path):
            return []
        try:
            metadata = run_dir.read_json(path)
            entries = metadata.get("backups") or [
                {"epoch": metadata["epoch"], "weights": metadata["weights"]}
            ]
            entries = [{"epoch": int(e["epoch"]), "weights": str(e["weights"])}
                       for e in entries]
        except (run_dir.RunDirError, AttributeError, KeyError, TypeError,
                ValueError):
            return []
        return sorted(entries, key=lambda e: -e["epoch"])

    def _files(self):
        """`[{"epoch", "weights"}]` of the weights files present, newest first."""
        entries = []
        for path in glob.glob(os.path.join(self.backup_dir, "epoch_*.weights.h5")):
            match = _WEIGHTS_NAME.match(os.path.basename(path))
            if match:
                entries.append({"epoch": int(match.group(1)),
                                "weights": os.path.basename(path)})
        return sorted(entries, key=lambda e: -e["epoch"])

    def load_backup(self):
        if not self.model.built:
            raise ValueError(
                "AtomicBackupAndRestore needs a built model; call the model "
                "on a batch before fit()."
            )
        problems = []
        entries = self._entries()
        if not entries and os.path.exists(self.metadata_path):
            problems.append(f"{self.metadata_path} (rebuilt from "
                            "the weights files present)")
        if not entries:
            # No metadata (a kill before the first one was written) or a
            # damaged one: rebuild it from the weights files present.
            entries = self._files()
            if os.path.exists(self.metadata_path) and not entries:
                raise run_dir.RunDirError(
                    f"{self.metadata_path} is damaged and "
                    f"{self.backup_dir} holds no epoch_<e>.weights.h5 to "
                    f"rebuild it from; remove {self.backup_dir} to restart "
                    "the run from scratch."
                )
        if not entries:
            return
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        ema_steps = None
        for entry in entries:
            epoch = entry["epoch"]
            weights = os.path.join(self.backup_dir, entry["weights"])
            try:
                self.model.load_weights(weights)
            except Exception as error:  # h5py and Keras raise many kinds
                problems.append(f"{weights} ({_describe(error)})")
                continue
            if self.ema_state and optimizer is not None:
                from keras_ema import state_file

                step = int(keras.ops.convert_to_numpy(optimizer.iterations))
                if ema_steps is None:
                    ema_steps = state_file.backup_steps(self.backup_dir)
                if step not in ema_steps:
                    problems.append(_ema_problem(self.backup_dir, step))
                    continue
            if self.history_path and epoch > 0:
                try:
                    self._restore_history(epoch)
                except run_dir.DamagedFileError as error:
                    problems.append(f"{error.path} ({error.reason})")
                    continue
            if problems:
                print_msg(f"Resuming from epoch {epoch}, the newest backup "
                          f"that reads back whole (epochs count from 0; the "
                          f"progress bar shows it as {epoch + 1}); damaged: "
                          f"{'; '.join(problems)}")
            _keras_private.resume_at(self.model, epoch)
            return
        raise run_dir.RunDirError(
            f"Cannot resume from {self.backup_dir}: {'; '.join(problems)}; "
            f"remove {self.backup_dir} to restart the run from scratch."
        )

    def _restore_history(self, epochs):
        """Makes the run's history the first `epochs` rows, whole.

        The rows are taken from the run's `history.csv` if they are whole
        there, else from the copy in the backup; later rows (of epochs the
        resumed run trains again) are dropped.
        """
        try:
            rows = run_dir.read_history(self.history_path, epochs)
        except run_dir.DamagedFileError as damaged:
            try:
                rows = run_dir.read_history(self._history_copy(), epochs)
            except run_dir.DamagedFileError:
                raise damaged from None
            print_msg(f"{self.history_path} was damaged ({damaged.reason}); "
                      f"its first {epochs} rows were restored from "
                      f"{self._history_copy()}.")
        run_dir.write_csv(self.history_path, rows)

    def save_backup(self):
        # With a background writer (`keras_ema.writer`) open, each step is a
        # job of its queue, in this order: the metadata, written last, names
        # files already whole.
        os.makedirs(self.backup_dir, exist_ok=True)
        writer.submit(self._copy_history)
        name = f"epoch_{self.current_epoch}.weights.h5"
        run_dir.save_weights(self.model, os.path.join(self.backup_dir, name))
        writer.submit(self._commit, self.current_epoch, name)

    def _copy_history(self):
        if self.history_path and os.path.exists(self.history_path):
            with open(self.history_path, "rb") as f:
                run_dir.write_bytes(self._history_copy(), f.read())

    def _commit(self, epoch, name):
        """Writes the metadata naming `name` (of `epoch`), then removes older files."""
        newest = {"epoch": epoch, "weights": name}
        older = [e for e in self._entries() or self._files()
                 if e["epoch"] < epoch]
        kept = [newest] + older[:1]
        run_dir.write_json(self.metadata_path, {
            "epoch": newest["epoch"], "weights": name, "backups": kept,
        })
        names = {e["weights"] for e in kept}
        for entry in self._files():
            if entry["weights"] not in names:
                os.remove(os.path.join(self.backup_dir, entry["weights"]))


def _describe(error):
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 200 else text[:197] + "..."


def _ema_problem(backup_dir, step):
    """Why the MultiEMA state of `step` cannot be restored, in a few words."""
    from keras_ema import state_file

    path = state_file.state_path(backup_dir, step)
    if not os.path.exists(path):
        return f"{path} (missing)"
    try:
        state_file.read_state_file(path)
    except ValueError as error:
        return str(error).rstrip(".")
    return f"{path} (unreadable)"
