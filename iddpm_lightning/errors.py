"""The one exception type for settings a user can fix."""


class ConfigError(ValueError):
    """A bad setting. Its message is one sentence naming the setting and the fix.

    The CLI prints it without a traceback and exits with status 2, before any
    training time is spent.
    """


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; raised before the optimizer step applies it."""
