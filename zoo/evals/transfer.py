"""`transfer` (Table 4): linear-probe accuracy of the frozen features on another dataset."""

import numpy as np

from zoo.data import load_dataset
from zoo.evals import MODELS
from zoo.evals import EvaluationError
from zoo.evals.metrics import aggregate


def check(runs: list, options) -> None:
    if not options.transfer_dataset:
        raise EvaluationError(
            "--evals=transfer needs --transfer_dataset (e.g. digits, cifar10, "
            "folder:PATH) with images of the runs' size."
        )


def run(ev, runs: list, figures: dict, options, seed=0) -> dict:
    """Table 4: linear-probe accuracy of the frozen features on another dataset."""
    from keras_ema.linear_probe import linear_probe

    dataset = options.transfer_dataset
    epochs = options.probe_epochs
    per_run = []
    for r in runs:
        source = ev.data(r)
        train, test = _target(dataset, options.transfer_data_dir, source, seed)
        row = {}
        for which in ev.models(MODELS):
            ev.log(f"  {r.name}: linear probe of {ev.name(which)} on {dataset}")
            row[which] = {"accuracy": 100 * linear_probe(
                ev.model(r, which), train, test, epochs=epochs, seed=seed)}
        per_run.append(row)
    return {"per_run": per_run, "table": aggregate(per_run),
            "transfer_dataset": dataset, "probe_epochs": epochs}


def _target(dataset, data_dir, source, seed):
    """`(train, test)` of `dataset`, normalized as the backbone's own training data."""
    height, width = source.image_shape[:2]
    try:
        target = load_dataset(dataset, data_dir=data_dir, val_fraction=0.0,
                              seed=seed, image_size=(height, width)
                              if dataset.startswith("folder:")
                              or dataset == "tiny_imagenet" else None)
    except ValueError as error:
        raise EvaluationError(f"--transfer_dataset={dataset}: {error}") from None
    if target.image_shape != source.image_shape:
        raise EvaluationError(
            f"--transfer_dataset={dataset} has images of shape "
            f"{target.image_shape}, the backbone takes {source.image_shape}; "
            "choose a dataset of the same image size."
        )
    # The backbone sees inputs normalized as in its own training.
    return ((_normalized(target.x_train, source), target.y_train),
            (_normalized(target.x_test, source), target.y_test))


def _normalized(x, data):
    return ((x.astype(np.float32) / 255.0 - data.mean) / data.std).astype(np.float32)
