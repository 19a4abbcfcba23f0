"""fitprobe's HTTP client (`client.py`) and its CI gate, `fitprobe-preflight` (`preflight.py`): httpx only."""
