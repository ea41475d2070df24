"""Messages to the user, printed the way Keras prints its own.

Public to the experiment kit (`zoo/` imports it), with a stable interface;
the module is to be renamed `keras_ema.messages` (RENAME.md).
"""

import keras


def print_msg(message: str):
    """Prints `message` as Keras prints its own (progress bars, summaries).

    To stdout, or to `absl.logging` (INFO) after
    `keras.config.disable_interactive_logging()`. This is Keras's
    `io_utils.print_msg` (Keras 3.15.1, `keras/src/utils/io_utils.py`, not
    exported), rebuilt on its public switch.
    """
    if keras.config.is_interactive_logging_enabled():
        print(message, flush=True)
    else:
        from absl import logging

        logging.info(message)
