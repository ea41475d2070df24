"""Training throughput of the zoo's models, and Keras-on-JAX against PyTorch.

Default mode: training images per second of each zoo model (`--models`,
default all four: resnet18, resnet34, wrn28_10, vgg16) at `--batch_size`
(default 128), in float32 and in mixed precision, on whatever device the
Keras backend runs on. The step is `train.py`'s: `model.fit` with
`zoo.regularization.PyTorchSGD` (momentum 0.9, Nesterov, the paper's weight
decay on the kernels: 1e-4 ResNet, 5e-4 WRN and VGG), sparse cross-entropy
on logits, the accuracy metric and `train.py`'s
`jit_compile` rule (XLA except for TensorFlow on CPU). The data is one
synthetic batch (random uint8 32x32x3 images, normalized to float32, 100
classes) held in memory and repeated, so the input pipeline costs nothing.
`fit` runs `--warmup_steps` (default 3; the first one compiles) and then
`--steps` (default 10) timed steps; a callback takes the time at the end of
each batch, so tracing and compilation are not timed. Under JAX the callback
is async-safe, so `fit` keeps dispatching ahead as a plain `fit` does; it
waits on each step's loss in Keras' callback thread, so the times are those
at which the steps finished. Under TensorFlow, callbacks run in `fit`'s own
loop, which then waits on every step (as any `fit` with a callback does).

Mixed precision is `mixed_float16` on a GPU and `mixed_bfloat16` on a CPU or
TPU (`--mixed auto`), or what `--mixed` names (`--mixed none`: float32
only). The global dtype policy is restored after each run. The table lists
model, precision, trainable parameters (PyTorch's count: no BatchNorm moving
statistics), images/s and ms/step. `--width` scales every model's filters,
so narrow copies can be tried on a CPU.

    python benchmarks/throughput.py                           # TensorFlow
    KERAS_BACKEND=jax python benchmarks/throughput.py         # JAX
    python benchmarks/throughput.py --models resnet18,vgg16 --width 0.125 \\
        --batch_size 32 --steps 3 --warmup_steps 1           # a quick CPU try

`--compare-torch` mode (for a GPU machine with JAX and PyTorch; TensorFlow
is not needed): the zoo's ResNet-18 under Keras on JAX against the equivalent
PyTorch CIFAR ResNet-18 defined in this file (basic blocks [2, 2, 2, 2], a
3x3 stride-1 stem without max-pool, widths 64..512 times `--width`,
BatchNorm, 100 classes), trained in the same process with the same batch,
steps, optimizer (SGD, momentum 0.9, Nesterov, weight decay 1e-4 on conv and
linear weights only, as the zoo does) and precision: Keras `mixed_bfloat16`
against torch bf16 autocast (`--mixed mixed_float16`: float16 with loss
scaling on both sides; `--mixed none`: float32, TF32 matmuls allowed on both
sides as JAX does by default). Torch uses channels_last, cudnn.benchmark and
`torch.compile` (`--torch_compile_mode`). Neither side computes metrics.
It prints the images/s of each and the ratio keras/torch; the goal is a ratio
of at least 0.9. KERAS_BACKEND defaults to jax in this mode, and JAX's GPU
memory preallocation to 45% (XLA_PYTHON_CLIENT_MEM_FRACTION) so that torch
has room in the same process. Without CUDA, torch runs on the CPU (it says
so). For stable numbers use more steps, e.g. `--steps 100`.

    KERAS_BACKEND=jax python benchmarks/throughput.py --compare-torch
"""

import argparse
import os
import platform
import sys
import time

COMPARE_FLAGS = ("--compare-torch", "--compare_torch")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if any(flag in sys.argv[1:] for flag in COMPARE_FLAGS):
    # Before Keras (and with it JAX) is imported.
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

# zoo/ and _cli are the repository's, not installed: import them from this checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _cli  # noqa: E402

if __name__ == "__main__":  # Ctrl-C, SIGTERM: one line, also while Keras imports
    _cli.handle_interrupts(f"benchmarks/{os.path.basename(__file__)}")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import zoo.models  # noqa: E402
from zoo.regularization import PyTorchSGD  # noqa: E402

PROG = "throughput.py"
NUM_CLASSES = 100
IMAGE_SHAPE = (32, 32, 3)
LEARNING_RATE = 0.01  # small enough that random labels do not blow up to NaN
# The paper's weight decay per family, as zoo.run.config.DEFAULT_WEIGHT_DECAY.
WEIGHT_DECAY = {"resnet": 1e-4, "wrn": 5e-4, "vgg": 5e-4}
GOAL_RATIO = 0.9


def weight_decay_for(name):
    return next(wd for family, wd in WEIGHT_DECAY.items() if name.startswith(family))


# === Device and precision ===


def device_info():
    """Returns (kind, description): kind is "gpu", "tpu" or "cpu"."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return "gpu", details.get("device_name", "GPU")
        if tf.config.list_logical_devices("TPU"):
            return "tpu", "TPU"
    elif backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform in ("gpu", "cuda", "rocm"):
            return "gpu", device.device_kind
        if device.platform == "tpu":
            return "tpu", device.device_kind
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            return "gpu", torch.cuda.get_device_name(0)
    return "cpu", cpu_description()


def cpu_description():
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({name}, {os.cpu_count()} logical cores)"


def mixed_policy(choice, device_kind):
    if choice == "auto":
        return "mixed_float16" if device_kind == "gpu" else "mixed_bfloat16"
    return None if choice == "none" else choice


def jit_compile(device_kind):
    """`train.py`'s rule (zoo.run.experiment): XLA slows TF convolutions on CPU."""
    if keras.backend.backend() == "tensorflow" and device_kind == "cpu":
        return False
    return "auto"


# === Keras ===


class StepTimer(keras.callbacks.Callback):
    """The wall time at the end of each training batch, by batch index.

    Async-safe: under a thread-safe backend (JAX) Keras then calls it from its
    callback thread pool after converting the batch's logs to Python floats,
    which waits for that step to finish, so `fit` keeps dispatching ahead.
    """

    async_safe = True

    def on_train_begin(self, logs=None):
        self.times = {}

    def on_train_batch_end(self, batch, logs=None):
        self.times[batch] = time.perf_counter()

    def elapsed(self, warmup_steps, steps):
        """Seconds from the end of the warm-up to the end of the last step."""
        return self.times[warmup_steps + steps - 1] - self.times[warmup_steps - 1]


def synthetic_batch(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch_size, *IMAGE_SHAPE), dtype=np.uint8)
    x = ((images.astype(np.float32) / 255.0 - 0.5) / 0.25).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=(batch_size,)).astype(np.int32)
    return x, y


def repeated_dataset(x, y):
    """The batch (x, y) forever, as the backend's cheapest in-memory source."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.data.Dataset.from_tensors((x, y)).repeat()
    # JAX (and torch): the tensors are converted once, onto the device; the
    # generator hands out the same ones at every step.
    x = keras.ops.convert_to_tensor(x)
    y = keras.ops.convert_to_tensor(y)

    def forever():
        while True:
            yield x, y

    return forever()


def count_trainable(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def time_keras(name, policy, args, device_kind, metrics=True):
    """Builds `name` under `policy` and times `fit`; returns (params, seconds).

    The global dtype policy is restored before returning.
    """
    previous = keras.mixed_precision.global_policy()
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model = zoo.models.get_model(name, NUM_CLASSES, IMAGE_SHAPE, width=args.width)
        weight_decay = (args.weight_decay if args.weight_decay is not None
                        else weight_decay_for(name))
        model.compile(
            optimizer=PyTorchSGD(LEARNING_RATE, momentum=0.9, nesterov=True,
                                 weight_decay=weight_decay),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"] if metrics else None,
            jit_compile=jit_compile(device_kind),
        )
        timer = StepTimer()
        model.fit(repeated_dataset(*synthetic_batch(args.batch_size)), epochs=1,
                  steps_per_epoch=args.warmup_steps + args.steps, shuffle=False,
                  verbose=0,
                  callbacks=[timer])
        return count_trainable(model), timer.elapsed(args.warmup_steps, args.steps)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def run_table(args):
    device_kind, device = device_info()
    mixed = mixed_policy(args.mixed, device_kind)
    policies = ["float32"] + ([mixed] if mixed else [])
    print(f"\nTraining throughput, Keras {keras.__version__} on "
          f"{keras.backend.backend()}, {device}; batch {args.batch_size}, "
          f"{IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]} inputs, {NUM_CLASSES} classes, "
          f"width {args.width:g}, {args.steps} timed steps after "
          f"{args.warmup_steps} warm-up:", flush=True)
    header = (f"  {'model':10s} {'precision':15s} {'params':>12s} "
              f"{'images/s':>10s} {'ms/step':>9s}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    rows = []
    for name in args.models:
        for policy in policies:
            params, seconds = time_keras(name, policy, args, device_kind)
            per_step = seconds / args.steps
            rate = args.batch_size / per_step
            rows.append((name, policy, params, rate, per_step))
            print(f"  {name:10s} {policy:15s} {params:12,d} {rate:10.1f} "
                  f"{per_step * 1e3:9.1f}", flush=True)
    return rows


# === PyTorch ===


def torch_resnet18(torch, width, num_classes):
    """The PyTorch CIFAR ResNet-18 that `zoo.resnet.ResNet` reproduces.

    kuangliu/pytorch-cifar's: a 3x3 stride-1 conv-BN-ReLU stem (no max-pool),
    four stacks of two post-activation basic blocks (64, 128, 256, 512
    filters times `width`, rounded as the zoo does; stride 2 from the second
    stack on, with a 1x1 conv + BN projection shortcut wherever the shape
    changes), global average pooling and one linear layer. BatchNorm with
    torch's defaults (momentum 0.1, eps 1e-5) is the zoo's (0.9, 1e-5); conv
    kernels start He-normal with fan-out, as in the zoo.
    """
    nn = torch.nn
    functional = torch.nn.functional

    class BasicBlock(nn.Module):
        def __init__(self, in_filters, filters, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(in_filters, filters, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(filters)
            self.conv2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(filters)
            self.shortcut = nn.Identity()
            if stride != 1 or in_filters != filters:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_filters, filters, 1, stride, bias=False),
                    nn.BatchNorm2d(filters),
                )

        def forward(self, x):
            out = functional.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return functional.relu(out + self.shortcut(x))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            filters = [zoo.layers.scale_filters(f, width) for f in (64, 128, 256, 512)]
            self.stem = nn.Sequential(
                nn.Conv2d(3, filters[0], 3, 1, 1, bias=False),
                nn.BatchNorm2d(filters[0]),
                nn.ReLU(inplace=True),
            )
            blocks = []
            in_filters = filters[0]
            for stack, stack_filters in enumerate(filters):
                for block in range(2):
                    stride = 2 if stack > 0 and block == 0 else 1
                    blocks.append(BasicBlock(in_filters, stack_filters, stride))
                    in_filters = stack_filters
            self.blocks = nn.Sequential(*blocks)
            self.classifier = nn.Linear(in_filters, num_classes)
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out",
                                            nonlinearity="relu")

        def forward(self, x):
            x = self.blocks(self.stem(x))
            x = torch.flatten(functional.adaptive_avg_pool2d(x, 1), 1)
            return self.classifier(x)

    return ResNet18()


def time_torch(torch, args, precision):
    """Trains the torch ResNet-18 on one repeated batch; returns (params, seconds)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    # float32 runs: TF32 matmuls and convs, as JAX does by default on GPUs.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = torch_resnet18(torch, args.width, NUM_CLASSES)
    model = model.to(device, memory_format=torch.channels_last)
    # Coupled weight decay on conv and linear weights only, as the zoo's
    # PyTorchSGD (not on BatchNorm gamma/beta or biases).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    weight_decay = args.weight_decay if args.weight_decay is not None else 1e-4
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=LEARNING_RATE, momentum=0.9, nesterov=True,
    )
    params = sum(p.numel() for p in model.parameters())
    net = model
    if args.torch_compile_mode != "none":
        net = torch.compile(model, mode=args.torch_compile_mode)
    x_np, y_np = synthetic_batch(args.batch_size)
    # NHWC numpy -> an NCHW view with channels_last strides.
    x = torch.from_numpy(x_np).permute(0, 3, 1, 2).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(y_np).long().to(device)
    autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "float16")
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup_steps):
        loss = step()
    loss.item()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    if not np.isfinite(loss.item()):
        print(f"{PROG}: warning: the torch loss is not finite", file=sys.stderr)
    return params, seconds


def run_compare(args, torch):
    device_kind, device = device_info()
    if args.mixed in ("auto", "mixed_bfloat16"):
        policy, precision = "mixed_bfloat16", "bfloat16"
    elif args.mixed == "mixed_float16":
        policy, precision = "mixed_float16", "float16"
    else:
        policy, precision = "float32", "float32"
    torch_device = ("cuda, " + torch.cuda.get_device_name(0)
                    if torch.cuda.is_available() else "CPU")
    print(f"\nResNet-18 training throughput, Keras {keras.__version__} on "
          f"{keras.backend.backend()} ({device}) vs PyTorch {torch.__version__} "
          f"({torch_device}); batch {args.batch_size}, "
          f"{IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]} inputs, {NUM_CLASSES} classes, "
          f"width {args.width:g}, {precision}, {args.steps} timed steps after "
          f"{args.warmup_steps} warm-up:", flush=True)
    if not torch.cuda.is_available():
        print("  note: CUDA is not available; PyTorch runs on the CPU.")
    if keras.backend.backend() != "jax":
        print(f"  note: KERAS_BACKEND is {keras.backend.backend()}, not jax.")
    keras_params, keras_seconds = time_keras("resnet18", policy, args,
                                             device_kind, metrics=False)
    torch_params, torch_seconds = time_torch(torch, args, precision)
    compile_mode = ("eager" if args.torch_compile_mode == "none"
                    else f"torch.compile {args.torch_compile_mode}")
    rows = [
        (f"keras/{keras.backend.backend()}", keras_params, keras_seconds),
        (f"torch ({compile_mode})", torch_params, torch_seconds),
    ]
    header = f"  {'framework':30s} {'params':>12s} {'images/s':>10s} {'ms/step':>9s}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    rates = []
    for label, params, seconds in rows:
        per_step = seconds / args.steps
        rates.append(args.batch_size / per_step)
        print(f"  {label:30s} {params:12,d} {rates[-1]:10.1f} {per_step * 1e3:9.1f}")
    ratio = rates[0] / rates[1]
    verdict = "met" if ratio >= GOAL_RATIO else "NOT met"
    print(f"  ratio keras/torch (images/s): {ratio:.3f}; goal >= {GOAL_RATIO}: "
          f"{verdict}")
    if keras_params != torch_params:
        print(f"  note: the parameter counts differ ({keras_params:,} vs "
              f"{torch_params:,}); the models are not the same.")
    return ratio


# === Command line ===


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for what is timed and how.")
    parser.add_argument("--models", default=",".join(zoo.models.MODELS),
                        help="comma-separated zoo model names (default: all)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0,
                        help="filter-count multiplier of every model")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup_steps", type=int, default=3,
                        help="untimed steps first (at least 1: it compiles)")
    parser.add_argument("--mixed", default="auto",
                        choices=["auto", "mixed_bfloat16", "mixed_float16", "none"],
                        help="the mixed-precision policy timed besides float32; "
                        "auto: mixed_float16 on a GPU, else mixed_bfloat16 "
                        "(--compare-torch: auto is mixed_bfloat16, none float32)")
    parser.add_argument("--weight_decay", type=float, default=None,
                        help="coupled SGD weight decay on kernels (default: the "
                        "paper's, 1e-4 ResNet, 5e-4 WRN and VGG)")
    parser.add_argument(*COMPARE_FLAGS, dest="compare_torch", action="store_true",
                        help="Keras-on-JAX ResNet-18 against PyTorch's")
    parser.add_argument("--torch_compile_mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "none"],
                        help="torch.compile mode in --compare-torch (none: eager)")
    args = parser.parse_args(argv)

    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in zoo.models.MODELS]
    if unknown or not args.models:
        sys.exit(f"{PROG}: error: unknown model name(s) "
                 f"{', '.join(map(repr, unknown)) or '(none given)'}; known: "
                 f"{', '.join(zoo.models.MODELS)}")
    for flag, value, least in (("--batch_size", args.batch_size, 1),
                               ("--steps", args.steps, 1),
                               ("--warmup_steps", args.warmup_steps, 1)):
        if value < least:
            sys.exit(f"{PROG}: error: {flag} must be at least {least}; got {value}")
    if not args.width > 0:
        sys.exit(f"{PROG}: error: --width must be positive; got {args.width}")
    if args.weight_decay is not None and args.weight_decay < 0:
        sys.exit(f"{PROG}: error: --weight_decay must be >= 0; got {args.weight_decay}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.compare_torch:
        try:
            import torch
        except ImportError as error:
            sys.exit(f"{PROG}: error: --compare-torch needs PyTorch, which is not "
                     f"importable here ({error})")
        run_compare(args, torch)
    else:
        run_table(args)


if __name__ == "__main__":
    _cli.main_of(main)()
