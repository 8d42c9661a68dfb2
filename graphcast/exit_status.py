"""Exit statuses of the command-line tools, one per kind of user error.

A user error (bad config, data, statistics, checkpoint, output location...) prints one line,
`error: <Kind>: <what is wrong and what to do>`, and exits with its kind's status, so scripts
and schedulers can tell them apart. Anything else is a bug and keeps Python's traceback.
"""

import sys
from typing import Callable, NoReturn, Sequence, Tuple, Type, TypeVar

CONFIG = 2          # a config field or command-line flag is unknown, missing or out of range
SAVE_TIMEOUT = 3    # a checkpoint save did not finish in training.checkpoint_save_timeout_s
DATA = 4            # input data missing, malformed, corrupt, non-finite or unreachable
STATS = 5           # normalization statistics missing, incomplete or invalid
CHECKPOINT = 6      # checkpoint unreadable, non-finite, absent or not matching the config
LOCATION = 7        # an output location is not writable or not reachable
LOCKED = 8          # another training run holds the checkpoint directory
DIVERGED = 9        # training.max_consecutive_nonfinite non-finite steps in a row
INTERRUPTED = 130   # SIGINT (Ctrl-C)
TERMINATED = 143    # SIGTERM (after saving a checkpoint at the current step)

T = TypeVar("T")


def one_line(error: BaseException) -> str:
    """`<ErrorClass>: <message>` on one line (multi-line messages joined with '; ')."""
    text = "; ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def report(error: BaseException, status: int,
           scrub: Callable[[str], str] = lambda text: text) -> NoReturn:
    """Prints the user error's line (through `scrub`, e.g. a credential filter) to stderr and
    exits with `status`."""
    print(f"error: {scrub(one_line(error))}", file=sys.stderr, flush=True)
    sys.exit(status)


def run_reporting(fn: Callable[[], T], statuses: Sequence[Tuple[Type[BaseException], int]],
                  scrub: Callable[[str], str] = lambda text: text) -> T:
    """Runs `fn`; an error of a listed class (first match wins) is reported with its status."""
    try:
        return fn()
    except tuple(kind for kind, _ in statuses) as error:
        report(error, next(status for kind, status in statuses if isinstance(error, kind)), scrub)
