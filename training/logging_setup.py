"""The console log of experiment.py: credentials redacted from every line, and libraries' INFO
lines shown only with --verbosity=1."""

import logging as std_logging

from absl import logging

from training import preflight


class OwnInfoOnly(std_logging.Filter):
    """Keeps the console readable: libraries' INFO lines (orbax, jaxline's config dump)
    show only with --verbosity=1; our own INFO lines and every warning always show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "site-packages" not in record.pathname


class Redacting(std_logging.Filter):
    """Removes credentials (URL user:password@, token/key/signature query values) from every
    log line, whoever logs it (jaxline logs the whole config)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = preflight.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install(verbosity: int) -> None:
    """Adds the filters to absl's handler (libraries' INFO lines only at verbosity >= 1)."""
    logging.get_absl_handler().addFilter(Redacting())
    if verbosity < 1:
        logging.get_absl_handler().addFilter(OwnInfoOnly())
