"""The settings of a training run: `Config`, its flags and its flag file.

`Config` is the one schema of the training configuration: each field carries
its help text, its choices and its bounds (`dataclasses.field(metadata=...)`),
`train.py` defines its absl flags by looping over the fields, and the flag file
of a run (`RUN/flags.cfg`) is written by `to_flags` and read back by
`read_flags`. Importing this module imports neither Keras nor the rest of the
kit, so that `train.py --help` answers at once.
"""

import dataclasses
import math
import numbers

# The paper's weight decay per architecture (App. F), `--weight_decay=paper`.
DEFAULT_WEIGHT_DECAY = {"resnet": 1e-4, "wrn": 5e-4, "vgg": 5e-4}
PAPER = "paper"
# `zoo.models.MODELS`, named here without importing Keras.
MODELS = ("resnet18", "resnet34", "wrn28_10", "vgg16")
AVERAGING = ("ema", "sema", "belay")
MIXED_PRECISION = ("", "mixed_float16", "mixed_bfloat16")
EXPORT_FROM = ("final", "best_accuracy", "best_loss")
DISTRIBUTION = ("none", "mirrored", "multiworker", "data_parallel")
# `keras_ema.DEFAULT_DECAYS`, named here without importing Keras.
DEFAULT_DECAYS = (0.968, 0.984, 0.992, 0.996, 0.998)
# Wider copies of the paper's models do not fit in memory (ResNet-18 at 16x
# has 2.9 billion parameters); the bound turns a typo into a message.
MAX_WIDTH = 16
MAX_SEED = 2**32 - 1  # numpy.random.seed and keras.utils.set_random_seed
MAX_IMAGE_SIZE = 1024
# Flags added after run directories were first written: left out of flags.cfg
# at their default, so that older run directories still resume.
WRITTEN_ONLY_WHEN_SET = ("image_size", "snapshot_every", "selection_from")
# Flags a resumed run may change: where it is written and how it is spread.
RESUMABLE_CHANGES = ("output_dir", "distribution")
# Decays closer than this are one EMA: MultiEMA prints them (and their
# per-step equivalents) with 6 decimals, the curves with 6 significant digits,
# and its update computes in float32 (steps of 6e-8 near 1).
DECAY_RESOLUTION = 1e-6
# Seconds a process waits for the others of a multi-process run to join.
DEFAULT_CONNECT_TIMEOUT = 120.0


class ConfigError(ValueError):
    """A training configuration is invalid; the message says which flag and why."""


def _field(default, help, choices=None, minimum=None, maximum=None, above=None,
           below=None, note="", parse=None):
    """A `Config` field: its default and, as metadata, its flag's description.

    `choices` lists the valid values (absl checks them on the command line
    too); `minimum` and `maximum` are inclusive bounds (absl checks
    `minimum`), `above` and `below` exclusive ones; `note` ends the message
    of a value out of bounds; `parse` turns the flag's text into its value
    (absl calls it on the command line; a `ValueError` is the flag's error).
    """
    metadata = {"help": help}
    for key, value in (("choices", choices), ("minimum", minimum),
                       ("maximum", maximum), ("above", above), ("below", below),
                       ("parse", parse)):
        if value is not None:
            metadata[key] = value
    if note:
        metadata["note"] = note
    return dataclasses.field(default=default, metadata=metadata)


def parse_weight_decay(value) -> "str | float":
    """`PAPER`, or `value` as a float if it is a finite number `>= 0` (or its text).

    A negative or infinite decay used to stand for the paper's: a typo or
    an overflow then trained silently with another decay than asked.

    Raises:
        ValueError: anything else, saying what to give.
    """
    if value == PAPER:
        return PAPER
    number = None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    if number is None or not (math.isfinite(number) and number >= 0):
        raise ValueError(
            f"must be a finite number >= 0, or {PAPER} for the paper's value "
            "(1e-4 ResNet, 5e-4 WRN and VGG)")
    return number


@dataclasses.dataclass
class Config:
    """Every setting of a training run; the field names are `train.py`'s flags.

    Each field's metadata holds the flag's `"help"` and, where they apply,
    its `"choices"` and bounds (`"minimum"`, `"maximum"` inclusive,
    `"above"`, `"below"` exclusive); `validate` checks them and the rules
    that span several fields.
    """

    output_dir: str = _field("", "Run directory (created; rerun to resume).")
    dataset: str = _field("digits", "digits, cifar10, cifar100, cifar10n, "
                          "cifar100n, tiny_imagenet or folder:PATH.")
    data_dir: str = _field("", "TFDS data dir, or the dataset folder.")
    image_size: int = _field(
        0, "Resize folder: and tiny_imagenet images to this many pixels "
        "square; 0: keep.", minimum=0, maximum=MAX_IMAGE_SIZE,
        note="; 0 keeps the stored size")
    model: str = _field("resnet18", "The model.", choices=MODELS)
    width: float = _field(1.0, "Width multiplier of the model (1 = paper).",
                          above=0, maximum=MAX_WIDTH,
                          note=" (1 is the paper's width)")
    epochs: int = _field(200, "Training epochs.", minimum=1)
    batch_size: int = _field(128, "Training batch size.", minimum=1)
    lr: float = _field(0.1, "Peak learning rate (after the warm-up).", above=0)
    # "paper" or a float; `resolved` makes it the float.
    weight_decay: str | float = _field(
        PAPER, "SGD weight decay on conv and dense kernels, coupled as in "
        "torch.optim.SGD; paper: the paper's (1e-4 ResNet, 5e-4 WRN and VGG).",
        parse=parse_weight_decay)
    momentum: float = _field(0.9, "SGD momentum.", minimum=0, below=1)
    nesterov: bool = _field(True, "Nesterov momentum.")
    warmup_epochs: int = _field(5, "Epochs of linear learning-rate warm-up "
                                "before the cosine decay.")
    ema_decays: tuple = _field(DEFAULT_DECAYS, "EMA decays.")
    ema_period: int = _field(16, "Optimizer steps per EMA update.", minimum=1)
    ema_warmup: bool = _field(True, "EMA warm-up min(a, (t+1)/(t+10)).")
    average_batch_norm: bool = _field(
        True, "Average the BatchNorm moving statistics too.")
    label_noise: str = _field("", "symmetric:R, or a CIFAR-N label set (aggre, "
                              "worse, random1-3, noise); empty: clean.")
    val_fraction: float = _field(
        0.2, "Held-out share of the training set; 0 trains on all of it and "
        "validates on test.", minimum=0, below=1,
        note="; 0 trains on all data and validates on test")
    seed: int = _field(0, "Seed of the split, noise, data order, init.",
                       minimum=0, maximum=MAX_SEED, note=" (numpy's seed range)")
    mixed_precision: str = _field("", "Mixed precision; empty: float32.",
                                  choices=MIXED_PRECISION)
    distribution: str = _field(
        "none", "mirrored or multiworker (TensorFlow), data_parallel (JAX); "
        "several processes: TF_CONFIG or KERAS_DISTRIBUTION_JOB_ADDRESSES, "
        "_NUM_PROCESSES, _PROCESS_ID (README: Several machines).",
        choices=DISTRIBUTION)
    export: bool = _field(False, "Export the chosen EMA model as a SavedModel "
                          "and a .keras file to RUN/export.")
    export_decay: float = _field(0.0, "The decay to export; 0: the largest.")
    export_from: str = _field("final", "Which EMA weights to export.",
                              choices=EXPORT_FROM)
    averaging: str = _field("ema", "ema (MultiEMA), sema (Switch EMA) or belay "
                            "(two-way coupled EMA).", choices=AVERAGING)
    sema_every_epochs: int = _field(
        1, "SEMA: copy the EMA into the model every this many epochs.", minimum=1)
    sema_start_epoch: int = _field(
        0, "SEMA: first epoch (0-based) that may end with a switch.", minimum=0)
    belay_coupling: float = _field(
        0.1, "BELAY: pull k of the model toward the EMA at each update.",
        minimum=0, below=1)
    selection_from: str = _field(
        "", "A finished tuning run (--val_fraction>0) of this configuration: "
        "with --val_fraction=0, keep the weights at the epochs its validation "
        "split chose.")
    snapshot_every: int = _field(
        0, "Write post-hoc EMA snapshots to RUN/snapshots every this many "
        "optimizer steps (0: off); see evaluate.py --evals=posthoc.", minimum=0,
        note=" (0: no snapshots)")

    def resolved(self) -> "Config":
        """A copy with the model-dependent defaults filled in, validated."""
        config = dataclasses.replace(
            self, ema_decays=tuple(float(d) for d in self.ema_decays)
        )
        try:
            config.weight_decay = parse_weight_decay(config.weight_decay)
        except ValueError as error:
            raise ConfigError(f"--weight_decay={config.weight_decay}: {error}") from None
        if config.weight_decay == PAPER:
            family = next(
                (f for f in DEFAULT_WEIGHT_DECAY if config.model.startswith(f)),
                "resnet",
            )
            config.weight_decay = DEFAULT_WEIGHT_DECAY[family]
        if not config.export_decay and config.ema_decays:
            config.export_decay = max(config.ema_decays)
        config.validate()
        # Plain Python numbers (not NumPy's), as the flag file writes them.
        for field in dataclasses.fields(config):
            if type(field.default) in (int, float):
                value = type(field.default)(getattr(config, field.name))
                setattr(config, field.name, value)
        return config

    def validate(self):
        """Raises ConfigError naming the first bad flag.

        In this order: each field alone (its type, choices and bounds), the
        rules that span the data and decay fields, those of the Keras
        backend, those of the averaging method.
        """
        self._check_fields()
        self._check_rules()
        self._check_backend()
        self._check_averaging()

    def _check_fields(self):
        from keras_ema.checks import is_int
        from keras_ema.checks import is_real

        if not self.output_dir:
            _fail("output_dir", "", "required; give the run directory to write")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kind = type(field.default)
            if kind is int and not is_int(value):
                _fail(field.name, repr(value),
                      f"must be an integer, not {type(value).__name__}")
            if kind is float and not is_real(value):
                _fail(field.name, repr(value),
                      f"must be a number, not {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                _fail(field.name, value, "must be a finite number")
            if isinstance(value, tuple):
                for v in value:
                    if not math.isfinite(v):
                        _fail(field.name, ",".join(map(str, value)),
                              f"{v} is not a finite number")
            problem = _check_field(field, value)
            if problem:
                _fail(field.name, value, problem)

    def _check_rules(self):
        if self.image_size and not (self.dataset.startswith("folder:")
                                    or self.dataset.lower() == "tiny_imagenet"):
            _fail("image_size", self.image_size, "resizes folder: and tiny_imagenet "
                  "images only; leave it 0 for this dataset")
        from zoo.data import reads_data_dir

        if self.data_dir and not reads_data_dir(self.dataset):
            _fail("data_dir", self.data_dir, f"--dataset={self.dataset} reads no "
                  "data directory (only the TFDS datasets and tiny_imagenet do); "
                  "leave it empty")
        if not 0 <= self.warmup_epochs < self.epochs:
            _fail("warmup_epochs", self.warmup_epochs,
                  f"must be in [0, --epochs={self.epochs})")
        if not self.ema_decays:
            _fail("ema_decays", "", "give at least one decay, e.g. 0.998")
        for d in self.ema_decays:
            if not 0 < d < 1:
                _fail("ema_decays", ",".join(map(str, self.ema_decays)),
                      f"decay {d} is outside (0, 1)")
        if len(set(self.ema_decays)) != len(self.ema_decays):
            _fail("ema_decays", ",".join(map(str, self.ema_decays)),
                  "decays must be distinct")
        close = _closest_decays(self.ema_decays)
        if close:
            _fail("ema_decays", ",".join(map(str, self.ema_decays)),
                  f"decays {close[0]} and {close[1]} differ by less than "
                  f"{DECAY_RESOLUTION:g}, the precision decays are printed with: "
                  "they are one EMA; give decays that differ in their first 6 "
                  "decimals")

    def _check_backend(self):
        import keras

        backend = keras.backend.backend()
        if self.distribution in ("mirrored", "multiworker") and backend != "tensorflow":
            _fail("distribution", self.distribution,
                  f"needs KERAS_BACKEND=tensorflow (the backend is {backend}); "
                  "use data_parallel on JAX")
        if self.distribution == "data_parallel" and backend != "jax":
            _fail("distribution", self.distribution,
                  f"needs KERAS_BACKEND=jax (the backend is {backend}); use "
                  "mirrored or multiworker on TensorFlow")

    def _check_averaging(self):
        if self.snapshot_every and self.averaging != "ema":
            _fail("snapshot_every", self.snapshot_every,
                  f"post-hoc snapshots need --averaging=ema (not {self.averaging})")
        if self.averaging != "ema" and len(self.ema_decays) != 1:
            _fail("ema_decays", ",".join(map(str, self.ema_decays)),
                  f"--averaging={self.averaging} keeps one EMA; give one decay")
        if self.export_decay not in self.ema_decays:
            _fail("export_decay", self.export_decay,
                  f"not one of --ema_decays={','.join(map(str, self.ema_decays))}")

    @classmethod
    def from_flags(cls, flags: dict) -> "Config":
        """The `Config` of a flag file's `{name: text}` (see `read_flags`).

        Unknown names are ignored; missing ones keep their defaults.
        """
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name not in flags:
                continue
            text = flags[field.name]
            default = field.default
            if isinstance(default, bool):
                value = text.lower() in ("true", "1", "yes")
            elif isinstance(default, tuple):
                value = tuple(float(v) for v in text.split(",") if v)
            elif isinstance(default, int):
                value = int(text)
            elif isinstance(default, float):
                value = float(text)
            else:
                value = text
            kwargs[field.name] = value
        return cls(**kwargs)

    def to_flags(self) -> str:
        """The flag file that replays this run (`--flagfile=RUN/flags.cfg`)."""
        lines = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in WRITTEN_ONLY_WHEN_SET and value == field.default:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, tuple):
                value = ",".join(repr(v) for v in value)
            elif isinstance(value, float):
                value = repr(value)
            lines.append(f"--{field.name}={value}")
        return "\n".join(lines) + "\n"


def _fail(flag, value, what):
    """Raises the `ConfigError` of `--flag=value`: `what` is wrong with it."""
    raise ConfigError(f"--{flag}={value}: {what}")


def _closest_decays(decays) -> tuple:
    """Two of `decays` closer than `DECAY_RESOLUTION`, or `()`."""
    ordered = sorted(decays)
    for a, b in zip(ordered, ordered[1:]):
        if b - a < DECAY_RESOLUTION:
            return a, b
    return ()


def _check_field(field, value) -> str:
    """What is wrong with `value` by `field`'s choices and bounds; `""`: nothing."""
    meta = field.metadata
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        named = ", ".join(c for c in choices if c)
        empty = " or leave it empty" if "" in choices else ""
        return f"unknown {field.name}; use one of {named}{empty}"
    low = meta.get("minimum", meta.get("above"))
    high = meta.get("maximum", meta.get("below"))
    too_low = low is not None and (value < low if "minimum" in meta else value <= low)
    too_high = high is not None and (value > high if "maximum" in meta else value >= high)
    if not (too_low or too_high):
        return ""
    if high is None:
        what = f"must be {'>=' if 'minimum' in meta else '>'} {low}"
    else:
        what = (f"must be in {'[' if 'minimum' in meta else '('}{low}, {high}"
                f"{']' if 'maximum' in meta else ')'}")
    return what + meta.get("note", "")


def config_from_flags(flag_values) -> Config:
    """A `Config` from parsed absl flags named like its fields."""
    kwargs = {}
    for field in dataclasses.fields(Config):
        value = flag_values[field.name].value
        if field.name == "ema_decays" and value is not None:
            try:
                value = tuple(float(v) for v in value)
            except ValueError:
                raise ConfigError(
                    f"--ema_decays={','.join(value)}: give numbers in (0, 1), "
                    "e.g. 0.99,0.998"
                ) from None
        kwargs[field.name] = value if value is not None else field.default
    return Config(**kwargs)


def define_flags(flag_values=None):
    """Defines one absl flag per `Config` field, from the field's metadata.

    Choices become `DEFINE_enum` (so `--help` lists them), tuples
    `DEFINE_list`, an inclusive lower bound absl's `lower_bound`; the other
    bounds are checked by `Config.validate`.

    Args:
        flag_values: `absl.flags.FlagValues` or `None`. Where to define them;
            `None`: `absl.flags.FLAGS`. Defaults to `None`.
    """
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    for field in dataclasses.fields(Config):
        meta, default, name = field.metadata, field.default, field.name
        kwargs = dict(flag_values=flag_values)
        if name == "output_dir":
            default = None  # required: no default on the command line
        if "parse" in meta:
            flags.DEFINE(_flag_parser(meta["parse"]), name, default, meta["help"],
                         **kwargs)
        elif "choices" in meta:
            flags.DEFINE_enum(name, default, list(meta["choices"]), meta["help"],
                              **kwargs)
        elif isinstance(default, bool):
            flags.DEFINE_boolean(name, default, meta["help"], **kwargs)
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, [repr(v) for v in default], meta["help"],
                              **kwargs)
        elif isinstance(default, (int, float)):
            define = (flags.DEFINE_integer if isinstance(default, int)
                      else flags.DEFINE_float)
            # The lower bound shows in --help; values above the upper one
            # get Config's message, which says why the bound is there.
            define(name, default, meta["help"], lower_bound=meta.get("minimum"),
                   **kwargs)
        else:
            flags.DEFINE_string(name, default, meta["help"], **kwargs)


def _flag_parser(parse):
    """An absl `ArgumentParser` whose `parse` is `parse`."""
    from absl import flags

    class Parser(flags.ArgumentParser):
        def parse(self, argument):
            return parse(argument)

    return Parser()


def read_flags(path: str) -> dict:
    """The `--name=value` lines of a flag file as a dict of strings.

    Raises:
        zoo.run.errors.DamagedFileError: the file is not text.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return read_flags_text(f.read())
    except UnicodeDecodeError as error:
        from zoo.run.errors import DamagedFileError  # not for --help: see above

        raise DamagedFileError(
            path, f"not text: {error}",
            "restore it, or rerun with --output_dir=NEW to train again") from None


def read_flags_text(text: str) -> dict:
    """The `--name=value` lines of a flag file's text as a dict of strings."""
    flags = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("--") and "=" in line:
            name, _, value = line[2:].partition("=")
            flags[name] = value
        elif line.startswith("--no") and line[4:]:
            flags[line[4:]] = "false"
        elif line.startswith("--"):
            flags[line[2:]] = "true"
    return flags


__all__ = ["Config", "ConfigError", "config_from_flags", "define_flags",
           "read_flags", "read_flags_text"]
