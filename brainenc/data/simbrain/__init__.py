"""simbrain: a simulated brain with known ground truth, written as canonical stores.

>>> from brainenc.data.simbrain import simulate, PRESETS
>>> paths = simulate(preset="tiny", out="data/simbrain", seed=0)   # doctest: +SKIP
>>> paths["simbrain7t"]                                            # doctest: +SKIP

See docs/simbrain.md for what is simulated.
"""

from .generate import simulate
from .presets import PRESETS, Assumptions, Preset, DatasetSpec, planned_shapes, stimulus_plan
from .responses import oracle_ceiling

__all__ = ["simulate", "PRESETS", "Assumptions", "Preset", "DatasetSpec", "planned_shapes", "stimulus_plan",
           "oracle_ceiling"]
