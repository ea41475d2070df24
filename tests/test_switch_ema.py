import keras
import numpy as np
import pytest

from keras_ema.switch_ema import SwitchEMA
from ema_reference import ReferenceEMA
from ema_reference import tiny_model
from ema_reference import data
from ema_reference import StopAtEpoch

pytestmark = pytest.mark.all_backends

DECAY = 0.8  # its warm-up ends at step 35, inside the 50-step runs below
STEPS_PER_EPOCH = 10


def numpy_of(variables):
    return [keras.ops.convert_to_numpy(v) for v in variables]


class Trace(keras.callbacks.Callback):
    """Chronological (kind, epoch, step, weights, optimizer variables, EMA)."""

    def __init__(self, ema=None):
        super().__init__()
        self.ema = ema

    def on_train_begin(self, logs=None):
        self.events = []
        self._record("begin", None)

    def on_train_batch_end(self, batch, logs=None):
        self._record("batch", None)

    def on_epoch_end(self, epoch, logs=None):
        self._record("epoch", epoch)

    def _record(self, kind, epoch):
        model = self.model
        ema = None
        if self.ema is not None and kind == "epoch":
            ema = self.ema.ema_weights(DECAY)
        self.events.append(dict(
            kind=kind,
            epoch=epoch,
            step=int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
            weights=model.get_weights(),
            slots=numpy_of(model.optimizer.variables),
            momentums=numpy_of(getattr(model.optimizer, "momentums", [])),
            ema=ema,
        ))

    def at_epoch_end(self, epoch):
        return next(e for e in self.events if e["epoch"] == epoch)


@pytest.mark.parametrize("switch_batch_norm", [True, False])
def test_switches_match_numpy_reference(switch_batch_norm):
    model = tiny_model()
    x, y = data()
    before = Trace()
    sema = SwitchEMA(DECAY, every_epochs=2, start_epoch=0, period=3,
                     switch_batch_norm=switch_batch_norm, verbose=0)
    after = Trace(sema)
    model.fit(x, y, batch_size=4, epochs=5, shuffle=False, verbose=0,
              callbacks=[before, sema, after])
    assert sema.switch_epochs == [1, 3]

    bn = model.get_layer("bn")
    index = {id(v): j for j, v in enumerate(model.weights)}
    stats = [index[id(bn.moving_mean)], index[id(bn.moving_variance)]]
    trainable = [index[id(v)] for v in model.trainable_variables]
    switched = trainable + (stats if switch_batch_norm else [])

    # The EMA averages the live weights of every batch end, whatever the
    # switches did to them in between.
    batches = [e for e in before.events if e["kind"] != "epoch"]
    ref = ReferenceEMA(batches[0]["weights"], (DECAY,), 3, True)
    for event in batches[1:]:
        ref.advance(event["step"], event["weights"])
        epoch = event["step"] // STEPS_PER_EPOCH - 1
        if event["step"] % STEPS_PER_EPOCH or epoch not in (1, 3):
            continue
        got, pre = after.at_epoch_end(epoch), before.at_epoch_end(epoch)
        for j, (w, p, e, r) in enumerate(zip(got["weights"], pre["weights"],
                                             got["ema"], ref.shadows[0])):
            if j in switched:
                np.testing.assert_array_equal(w, e, err_msg=f"weight {j}")
                np.testing.assert_allclose(w, r, rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(w, p, err_msg=f"weight {j}")
        assert not np.allclose(got["weights"][0], pre["weights"][0], atol=1e-3)
    for g, r in zip(sema.ema_weights(DECAY), ref.shadows[0]):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)

    for epoch in range(5):
        got, pre = after.at_epoch_end(epoch), before.at_epoch_end(epoch)
        # The optimizer's slots (momentum, iterations) are never touched.
        for a, b in zip(got["slots"], pre["slots"]):
            np.testing.assert_array_equal(a, b)
        if epoch not in (1, 3):
            for a, b in zip(got["weights"], pre["weights"]):
                np.testing.assert_array_equal(a, b)

    # SGD with momentum makes w_new = w_old + m_new: every step, the first of
    # an epoch after a switch included, starts from the weights the previous
    # event left, so the switched weights are the ones trained on.
    events = after.events
    for prev, event in zip(events, events[1:]):
        if event["kind"] != "batch":
            continue
        for j, m in zip(trainable, event["momentums"]):
            start = event["weights"][j].astype(np.float64) - m
            np.testing.assert_allclose(start, prev["weights"][j], rtol=0,
                                       atol=1e-6, err_msg=f"step {event['step']}")
        if prev["kind"] == "epoch" and prev["epoch"] in (1, 3):
            unswitched = before.at_epoch_end(prev["epoch"])["weights"][0]
            start = event["weights"][0] - event["momentums"][0]
            assert np.abs(start - unswitched).max() > 1e-4


@pytest.mark.parametrize(
    "every_epochs,start_epoch,expected",
    [(1, 0, [0, 1, 2, 3, 4, 5, 6, 7]), (2, 0, [1, 3, 5, 7]), (3, 2, [4, 7]),
     (1, 5, [5, 6, 7])],
)
def test_schedule(every_epochs, start_epoch, expected):
    model = tiny_model()
    sema = SwitchEMA(0.9, every_epochs=every_epochs, start_epoch=start_epoch,
                     verbose=0)
    sema.set_model(model)
    sema.on_epoch_begin(0)
    for epoch in range(8):
        assert sema.is_switch_epoch(epoch) == (epoch in expected)
        sema.on_epoch_end(epoch, {})
    assert sema.switch_epochs == expected


def test_live_model_after_a_switch_is_the_logged_ema():
    model = tiny_model()
    x, y = data()
    sema = SwitchEMA(DECAY, period=2, validation_data=(x, y), verbose=0)
    live = {}

    class LiveLoss(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            live[epoch] = self.model.evaluate(x, y, verbose=0, return_dict=True)["loss"]

    history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False,
                        verbose=0, callbacks=[sema, LiveLoss()])
    # After the switch the live model is the EMA that was just evaluated.
    for epoch, loss in live.items():
        assert history.history[f"ema_{DECAY}_val_loss"][epoch] == pytest.approx(
            loss, rel=1e-5)
    assert sema.switch_epochs == [0, 1]


def test_resume_with_backup_and_restore_matches_uninterrupted(tmp_path):
    x, y = data()

    def run(extra, backup):
        keras.utils.set_random_seed(7)
        model = tiny_model()
        sema = SwitchEMA(DECAY, start_epoch=1, period=3, backup_dir=backup,
                         verbose=0)
        callbacks = [sema]
        if backup:
            callbacks.append(keras.callbacks.BackupAndRestore(backup))
        model.fit(x, y, batch_size=4, epochs=4, shuffle=False, verbose=0,
                  callbacks=callbacks + extra)
        return model, sema

    model_a, sema_a = run([], None)
    backup = str(tmp_path / "backup")
    with pytest.raises(KeyboardInterrupt):
        run([StopAtEpoch(2)], backup)
    model_b, sema_b = run([], backup)
    assert sema_a.switch_epochs == sema_b.switch_epochs == [1, 2, 3]
    assert sema_b.num_updates == sema_a.num_updates
    for a, b in zip(model_a.get_weights(), model_b.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(sema_a.ema_weights(DECAY), sema_b.ema_weights(DECAY)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_state_roundtrip_and_mismatch():
    model = tiny_model()
    x, y = data(8)
    sema = SwitchEMA(DECAY, period=1, verbose=0)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[sema])
    state = sema.get_state()
    assert state["switch_epochs"] == [0, 1]

    other = SwitchEMA(DECAY, period=1, verbose=0)
    other.set_model(model)
    other._build(model)
    other.set_state(state)
    assert other.switch_epochs == [0, 1]
    assert other.step == sema.step == 4
    for a, b in zip(other.ema_weights(DECAY), sema.ema_weights(DECAY)):
        np.testing.assert_array_equal(a, b)

    mismatched = SwitchEMA(DECAY, every_epochs=2, period=1, verbose=0)
    mismatched.set_model(model)
    mismatched._build(model)
    with pytest.raises(ValueError, match="every_epochs=1"):
        mismatched.set_state(state)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(decay=1.0), "decay=1.0"),
        (dict(decay=True), "decay=True"),
        (dict(every_epochs=0), "every_epochs=0"),
        (dict(every_epochs=1.5), "every_epochs=1.5"),
        (dict(every_epochs=True), "every_epochs=True"),
        (dict(start_epoch=-1), "start_epoch=-1"),
        (dict(start_epoch=0.5), "start_epoch=0.5"),
        (dict(period=0), "period=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwitchEMA(**kwargs)
