"""keras-ema: exponential moving averages of weights for Keras 3."""

from keras_ema.batch_norm import recompute_batch_norm_statistics
from keras_ema.belay import Belay
from keras_ema.calibration import apply_temperature
from keras_ema.checkpoint import EMACheckpoint
from keras_ema.calibration import expected_calibration_error
from keras_ema.calibration import fit_temperature
from keras_ema.calibration import reliability_diagram
from keras_ema.disagreement import churn
from keras_ema.disagreement import jensen_shannon
from keras_ema.export import export_ema
from keras_ema.export import export_model
from keras_ema.linear_probe import linear_probe
from keras_ema.decay import DEFAULT_DECAYS
from keras_ema.decay import warmup_decay
from keras_ema.decay import warmup_end_step
from keras_ema.multi_ema import MultiEMA
from keras_ema.multi_ema import UntrackedDecayError
from keras_ema import lora
from keras_ema import posthoc
from keras_ema.switch_ema import SwitchEMA
from keras_ema.tensorboard import EMATensorBoard

# The one version string: pyproject.toml reads it (setuptools' dynamic
# `attr`), so an installed wheel and a checkout on PYTHONPATH agree.
__version__ = "0.1.0"
