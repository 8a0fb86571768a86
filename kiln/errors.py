"""The one exception type for mistakes a user can fix."""


class KilnError(Exception):
    """A user-fixable problem: the message names the file or config key and the fix."""
