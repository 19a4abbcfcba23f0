"""Verification: train a few optimizer steps with the plan, for real, and check that it holds up.

- `checks`: `run_verification(spec, plan)` → the checks a person reads (no OOM, peak within capacity
  less headroom, finite and falling loss, accumulated gradient = full-batch gradient, examples per step).
- `run`: the training run on every device (one process per rank when there are several).
- `gradient_check`: the accumulated gradient against the same examples cut differently.
- `noise`: the gradient noise scale, for the learning-rate guidance.
- `ranks`: spawning one process per device (shared with the measured sharded trials).

The face imports nothing, so importing one part costs only that part.
"""
