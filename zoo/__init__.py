"""zoo: the experiment kit of the paper: models, data, the training run.

The kit lives in this repository beside `train.py` and `evaluate.py`, which
import it from the checkout; it is not installed. Its modules are imported by
name (`zoo.models`, `zoo.data`, `zoo.run.experiment`, ...): importing
`zoo` itself imports nothing, so that `train.py --help` needs no Keras.
"""
