"""vLLM 0.11's /metrics, read: what it says is in flight. Standard library only.

The one home of "how many requests does this vLLM still have": the balancer
module (drain, with HAProxy) and the vllm_in_flight filter (drain without a
balancer) both read it here.
"""

from __future__ import annotations

import re
from typing import Optional

# vllm:num_requests_running / vllm:num_requests_waiting, one sample per engine
# (labels: model_name, engine). Running + waiting is what a restart would cut.
IN_FLIGHT = re.compile(r"(?m)^vllm:num_requests_(?:running|waiting)\{[^}]*\} ([0-9.e+]+)$")


def in_flight(metrics: Optional[str]) -> float:
    """Running + waiting requests in vLLM's /metrics text (0 for no text: nothing answers)."""
    return sum(float(value) for value in IN_FLIGHT.findall(metrics or ""))
