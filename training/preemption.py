"""SIGTERM (what SLURM and cloud preemption send first): stop after the current step, save a
checkpoint at that step, exit with status 143; past `training.sigterm_grace_s` exit anyway."""

import os
import threading

from absl import logging

from graphcast import exit_status

# Set by the SIGTERM handler: the training loop stops after the current step.
STOP_REQUESTED = threading.Event()


class Terminated(Exception):
    """SIGTERM ended the run (after the checkpoint at the current step was saved)."""


def on_sigterm(grace_s: float):
    """SIGTERM handler: stop after the current step (the checkpoint at that step is saved at the
    end of training); past `grace_s` s the process exits regardless, keeping the previous one."""
    def handler(signum, frame):
        del signum, frame
        if STOP_REQUESTED.is_set():
            return
        STOP_REQUESTED.set()
        logging.warning("SIGTERM: saving a checkpoint at the current step, then exiting "
                        "(at most training.sigterm_grace_s=%g s).", grace_s)

        def give_up():
            logging.error("SIGTERM: the checkpoint was not saved within %g s; exiting without it "
                          "(the previous checkpoint stays the newest).", grace_s)
            logging.flush()
            os._exit(exit_status.TERMINATED)

        timer = threading.Timer(grace_s, give_up)
        timer.daemon = True
        timer.start()
    return handler
