"""The exit codes of every fitprobe command: `fitprobe probe/trial/plan/whatif/preflight` and `fitprobe-preflight`.

One table for the torch-free client and the full command line (probe/cli.py imports it from here, as
the client may import neither torch nor probe/), so a pipeline reads the same code from either.
The words for each are in the --help of both commands.
"""

EXIT_OK = 0  # done, and the request is met
EXIT_UNMET = 1  # it ran, but the request cannot be met (does not fit, verification failed, plan not verified)
EXIT_BAD_INPUT = 2  # bad input: one line on stderr says what to change
EXIT_UNREACHABLE = 3  # the service is unreachable, failing, busy, or did not answer in time (preflight)
