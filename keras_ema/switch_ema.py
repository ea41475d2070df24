"""SwitchEMA: an EMA copied back into the model at chosen epoch ends."""

from keras_ema.checks import check_int
from keras_ema.batch_norm import batch_norm_statistics
from keras_ema.decay import check_decay
from keras_ema.multi_ema import MultiEMA


class SwitchEMA(MultiEMA):
    """An EMA of the weights that replaces the live weights every few epochs.

    Switch EMA (SEMA; Li et al., 2024, arXiv 2402.09240) keeps one EMA as
    `MultiEMA` does (same period, warm-up and BatchNorm statistics) and, at
    the end of chosen epochs, copies it into the model, so that the next
    epoch starts from the averaged weights. With `e` the 0-based epoch index
    that Keras passes, the copy happens at the end of epoch `e` when

    ```
    e >= start_epoch and (e - start_epoch + 1) % every_epochs == 0
    ```

    The defaults switch after every epoch, as in the SEMA paper. The copy is
    exact (the live weights equal the EMA bit for bit afterwards) and the
    EMA itself goes on averaging from its current value. The optimizer's
    slots (momentum, Adam moments) and step count are left as they are.
    The epochs at which a copy happened are listed in `switch_epochs`, which
    is part of `get_state` and of the `backup_dir` files, so a resumed run
    continues the same schedule.

    The copy follows this callback's own epoch-end work: the
    `ema_<decay>_val_*` logs and the `best` records describe the EMA just
    before the switch (which is the live model just after it), while the
    live model's `val_*` logs, computed by `fit` before any callback runs,
    describe the live weights before the switch. Place this callback before
    `keras.callbacks.BackupAndRestore` and `keras.callbacks.ModelCheckpoint`
    so that they save the switched weights.

    SEMA reports gains across tasks from this one change. Morales-Brotons
    et al. (arXiv 2411.18704, Sec. 3.3 and App. C) tried restarting SGD from
    the EMA once per epoch on CIFAR-100 and found no benefit: the noisy SGD
    steps quickly carry the restarted model away again. Running `MultiEMA`
    and `SwitchEMA` with the same seed measures both claims on your task.

    Args:
        decay: float in (0, 1). The EMA decay. Defaults to `0.998`.
        every_epochs: int >= 1. Epochs between two switches. Defaults to
            `1`.
        start_epoch: int >= 0. The first epoch (0-based) whose end may
            switch; the first switch happens at the end of epoch
            `start_epoch + every_epochs - 1`. Defaults to `0`.
        switch_batch_norm: bool. Whether the BatchNorm moving statistics
            are copied too. Only averaged statistics can be copied: with
            `average_batch_norm=False` the live statistics always stay.
            Defaults to `True`.
        **kwargs: the other arguments of `MultiEMA` (`period`, `warmup`,
            `average_batch_norm`, `validation_data`, `backup_dir`, ...).

    Example:

    ```python
    sema = keras_ema.SwitchEMA(decay=0.998, validation_data=(x_val, y_val))
    model.fit(x, y, epochs=100, callbacks=[sema])
    print(sema.switch_epochs)                # [0, 1, 2, ...]
    ```
    """

    def __init__(
        self,
        decay: float = 0.998,
        every_epochs: int = 1,
        start_epoch: int = 0,
        switch_batch_norm: bool = True,
        **kwargs,
    ):
        decay = check_decay(decay)
        every_epochs = check_int("every_epochs", every_epochs)
        start_epoch = check_int("start_epoch", start_epoch, minimum=0)
        super().__init__(decays=(decay,), **kwargs)
        self.decay = decay
        self.every_epochs = every_epochs
        self.start_epoch = start_epoch
        self.switch_batch_norm = bool(switch_batch_norm)
        self.switch_epochs = []

    def is_switch_epoch(self, epoch: int) -> bool:
        """Whether the end of 0-based epoch `epoch` switches the weights."""
        passed = epoch - self.start_epoch + 1
        return passed > 0 and passed % self.every_epochs == 0

    def _build(self, model):
        super()._build(model)
        self.switch_epochs = []

    def reset(self):
        super().reset()
        self.switch_epochs = []

    def _after_epoch_end(self, epoch, logs):
        if not self.is_switch_epoch(epoch):
            return
        model = self.model  # on JAX, attaches the training state first
        skip = () if self.switch_batch_norm else batch_norm_statistics(model)
        self._assign_ema(0, skip=skip)
        self.switch_epochs.append(int(epoch))

    def get_state(self) -> dict:
        state = super().get_state()
        state["every_epochs"] = self.every_epochs
        state["start_epoch"] = self.start_epoch
        state["switch_batch_norm"] = self.switch_batch_norm
        state["switch_epochs"] = list(self.switch_epochs)
        return state

    def set_state(self, state: dict):
        for key in ("every_epochs", "start_epoch", "switch_batch_norm"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"Cannot restore a SwitchEMA state with {key}={state[key]} "
                    f"into a SwitchEMA with {key}={getattr(self, key)}. Use "
                    "the same arguments."
                )
        try:
            switch_epochs = [int(e) for e in state.get("switch_epochs", [])]
        except (TypeError, ValueError):
            raise ValueError(
                "Invalid SwitchEMA state: switch_epochs must be a list of "
                f"ints. Received: {state.get('switch_epochs')!r}"
            ) from None
        super().set_state(state)
        self.switch_epochs = switch_epochs
