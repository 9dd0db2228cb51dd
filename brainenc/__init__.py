"""brainenc: train and compare image-to-fMRI encoding models."""

import time as _time

__version__ = "0.1.0"

#: When brainenc was first imported (``time.monotonic``): a command's start-up is measured from
#: here (``brainenc.lit.progress.EpochLine`` prints it), imports of torch and Lightning included
STARTED = _time.monotonic()
