"""The one exception type for settings a user can fix."""


class ConfigError(ValueError):
    """A bad setting. Its message is one sentence naming the setting and the fix.

    The CLI prints it without a traceback and exits with status 2, before any
    training time is spent.
    """


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; raised before the optimizer step applies it."""


class StopRequested(Exception):
    """SIGTERM or Ctrl-C stopped training at an optimizer-step boundary, after saving last.ckpt.
    ``signal`` is the signal's name."""

    def __init__(self, signal: str) -> None:
        super().__init__(signal)
        self.signal = signal
