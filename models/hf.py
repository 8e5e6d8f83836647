"""transformers as edgeqtl uses it: quietly. Its own progress bars ("Loading weights",
"Writing model shards") would interleave with ours, so they are switched off once, the
first time edgeqtl loads or saves a checkpoint; its warnings and errors still show."""
from __future__ import annotations

import functools


@functools.cache
def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
