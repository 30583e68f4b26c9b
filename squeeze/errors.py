"""The one exception type users see.

Every failure caused by the user's input (a bad checkpoint, a bad flag, a full disk) is raised as a
`SqueezeError` whose message is a single self-contained line. The CLI prints that line and exits
non-zero without a traceback; library callers can catch it. Bugs stay ordinary exceptions so they
keep their tracebacks.
"""

from __future__ import annotations


class SqueezeError(Exception):
    """A user-facing error: the message is the whole story, on one line."""


class CheckpointError(SqueezeError):
    """The checkpoint on disk is missing, incomplete, corrupt or inconsistent with its config."""


class ConfigError(SqueezeError):
    """config.json is missing a field, has a bad value, or describes an unsupported model."""
