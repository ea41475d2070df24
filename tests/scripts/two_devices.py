"""Runs train.py in one process that sees its CPU as 2 TensorFlow devices.

    python tests/scripts/two_devices.py [train.py flags]

With `--distribution=multiworker` and no `TF_CONFIG`, the one worker still
trains a single replica on CPU:0 (MultiWorkerMirroredStrategy uses one CPU
device per worker), on the whole of every global batch. Used by
tests/test_multiprocess.py as the one-process reference.
"""

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

if __name__ == "__main__":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.argv[0] = os.path.join(ROOT, "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
