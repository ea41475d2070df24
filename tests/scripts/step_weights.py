"""Runs train.py in a chosen float precision and saves the weights after each step.

    python tests/scripts/step_weights.py FLOATX DUMP_DIR [train.py flags]

FLOATX is `float32` or `float64`: Keras' default float type
(`keras.config.set_floatx`), so that the model's variables, its computation
and the optimizer's slots all use it (the images are normalized in float32
by the loader, as in every run, and cast to FLOATX by the model; on JAX
float64 needs `JAX_ENABLE_X64` and a float64 BatchNormalization, set here).
DUMP_DIR receives `step_0.npz` (the weights `fit` starts from) and `step_N.npz` after
optimizer step N, each mapping the variables' paths to their values.

On TensorFlow without `TF_CONFIG`, the CPU is seen as 2 logical devices, as
by tests/scripts/two_devices.py: the one-process reference of a 2-worker run.
Used by tests/test_multiprocess.py; the shipped code has no test hooks.
"""

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main():
    floatx, dump = sys.argv.pop(1), sys.argv.pop(1)
    if floatx == "float64":
        os.environ["JAX_ENABLE_X64"] = "1"  # else JAX makes float64 arrays float32
    import keras
    import numpy as np

    if keras.backend.backend() == "tensorflow" and not os.environ.get("TF_CONFIG"):
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    keras.config.set_floatx(floatx)
    if floatx == "float64" and keras.backend.backend() == "jax":
        # Keras' type promotion on JAX gives 32 bits where 64 meet 32 (JAX's
        # rule without x64): BatchNormalization, which computes in
        # `result_type(x.dtype, "float32")`, would compute in float32. With
        # x64 on, keep float64, as JAX's own promotion does.
        from keras.src.backend.common import dtypes

        dtypes.BIT64_TO_BIT32_DTYPE["float64"] = "float64"
    os.makedirs(dump, exist_ok=True)

    class SaveEveryStep(keras.callbacks.Callback):
        def _save(self, step):
            values = {v.path: keras.ops.convert_to_numpy(v.value)
                      for v in self.model.weights}
            np.savez(os.path.join(dump, f"step_{step}.npz"), **values)

        def on_train_begin(self, logs=None):
            self._save(0)

        def on_train_batch_end(self, batch, logs=None):
            self._save(int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)))

    from zoo.run import experiment

    train = experiment.train
    experiment.train = lambda config, **kw: train(
        config, callbacks=[SaveEveryStep()], **kw)
    sys.argv[0] = os.path.join(ROOT, "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
