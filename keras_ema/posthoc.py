"""Post-hoc EMA: any averaging after training, from snapshots of the EMAs.

Karras et al. 2023 ("Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2, Sec. 3 and App. C): every average of the weights is
a linear combination of the past iterates, with a *profile*, the weight it
gives to each iterate. Iterate `n` is the model weights after `n` optimizer
steps; iterate 0 is the initial weights, which the EMAs start equal to.

`MultiEMA(snapshot_dir=..., snapshot_every=N)` writes all its EMAs every `N`
optimizer steps, with the log of the updates actually applied (the optimizer
step whose weights each update read and the decay it used; updates applied
together under `steps_per_execution > 1` multiply their decays, skipped
non-finite updates are absent). From that log the profile of every stored
EMA is exact. A target profile (`EMAProfile`, `PowerProfile`,
`UniformProfile`) is matched by least squares over the profiles of the
snapshots at or before the target step, in float64, and the weights are
combined snapshot by snapshot, streaming from disk.

Example:

```python
ema = keras_ema.MultiEMA(decays=(0.9, 0.99), period=1,
                         snapshot_dir="snaps", snapshot_every=10)
model.fit(x, y, epochs=10, callbacks=[ema])
report = keras_ema.posthoc.synthesize_into(
    model, "snaps", keras_ema.posthoc.EMAProfile(0.97))
print(report.profile_error)
```

The parts, each in the file named after it: `posthoc_profiles` (the target
profiles and the profiles of an update log), `posthoc_snapshots` (the
snapshot files: writing, listing, reading, run-id checks, damaged files;
their format is `keras_ema.state_file`'s) and `posthoc_synthesis` (the
solve and the combination). This module re-exports their public names.
"""

from keras_ema.posthoc_profiles import EMAProfile
from keras_ema.posthoc_profiles import PowerProfile
from keras_ema.posthoc_profiles import UniformProfile
from keras_ema.posthoc_profiles import gamma_to_sigma_rel
from keras_ema.posthoc_profiles import log_profiles
from keras_ema.posthoc_profiles import sigma_rel_to_gamma
from keras_ema.posthoc_snapshots import SNAPSHOT_PREFIX
from keras_ema.posthoc_snapshots import check_snapshot_dir
from keras_ema.posthoc_snapshots import damaged_snapshots
from keras_ema.posthoc_snapshots import list_snapshots
from keras_ema.posthoc_snapshots import read_log
from keras_ema.posthoc_snapshots import read_meta
from keras_ema.posthoc_snapshots import snapshot_path
from keras_ema.posthoc_snapshots import write_snapshot
from keras_ema.posthoc_synthesis import Report
from keras_ema.posthoc_synthesis import UnmatchedTargetError
from keras_ema.posthoc_synthesis import solve
from keras_ema.posthoc_synthesis import synthesize
from keras_ema.posthoc_synthesis import synthesize_into

__all__ = [
    "EMAProfile", "PowerProfile", "UniformProfile", "gamma_to_sigma_rel",
    "sigma_rel_to_gamma", "log_profiles",
    "SNAPSHOT_PREFIX", "snapshot_path", "write_snapshot", "list_snapshots",
    "read_meta", "read_log", "damaged_snapshots", "check_snapshot_dir",
    "Report", "UnmatchedTargetError", "solve", "synthesize", "synthesize_into",
]
