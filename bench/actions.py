"""agentchassis actions of the bench, registered in the worker (``CHASSIS_ACTION_MODULES``)
and in the bench process (whose client validates plans against the actions it knows).

- ``bench_blob``: returns ``params.bytes`` bytes of random hexadecimal text, as a model's
  answer would be (the growth case's 10 KB outputs: not compressible to nothing).
"""

from __future__ import annotations

import os
from typing import Any

from chassis.actions import action


@action("bench_blob")
def blob(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """An output of ``params.bytes`` bytes of text."""
    size = int(params.get("bytes", 10_240))
    return {"text": os.urandom(size // 2 + 1).hex()[:size]}
