"""keras-ema: exponential moving averages of weights for Keras 3."""

from keras_ema.multi_ema import DEFAULT_DECAYS
from keras_ema.multi_ema import MultiEMA
from keras_ema.multi_ema import warmup_decay
from keras_ema.multi_ema import warmup_end_step

__version__ = "0.1.0"
