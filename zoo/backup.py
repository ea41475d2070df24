"""BackupAndRestore whose backup survives a kill at any instant."""

import json
import os

import keras

from zoo import run_dir


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` with kill-safe files.

    Keras' callback overwrites `latest.weights.h5` in place and writes the
    epoch to a second file afterwards, so a kill in between resumes the
    weights of one epoch with the epoch number of another. Here each backup
    writes `epoch_<e>.weights.h5` under a temporary name, renames it, and
    only then replaces `training_metadata.json`, which names that file; the
    previous weights are removed last. Whatever instant the process dies at,
    the metadata names a complete weights file of the epoch it records.

    Args:
        backup_dir: str. Where the backup lives; removed when training ends
            (unless `delete_checkpoint=False`).
        delete_checkpoint: bool. Whether to remove the backup at the end of
            training. Defaults to `True`.
    """

    def __init__(self, backup_dir, delete_checkpoint=True):
        super().__init__(backup_dir, save_freq="epoch",
                         delete_checkpoint=delete_checkpoint)

    def on_train_begin(self, logs=None):
        self._load_model()

    def _load_model(self):
        if not self.model.built:
            raise ValueError(
                "AtomicBackupAndRestore needs a built model; call the model "
                "on a batch before fit()."
            )
        if not os.path.exists(self._training_metadata_path):
            return
        metadata = run_dir.read_json(self._training_metadata_path)
        weights = os.path.join(self.backup_dir, metadata["weights"])
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(weights)
        self.model._initial_epoch = metadata["epoch"]

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch_{self._current_epoch}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        with run_dir.atomic_path(path) as tmp:
            self.model.save_weights(tmp, overwrite=True)
        previous = None
        if os.path.exists(self._training_metadata_path):
            previous = run_dir.read_json(self._training_metadata_path)["weights"]
        run_dir.write_text(
            self._training_metadata_path,
            json.dumps({"epoch": self._current_epoch, "weights": name}),
        )
        if previous and previous != name:
            old = os.path.join(self.backup_dir, previous)
            if os.path.exists(old):
                os.remove(old)
