"""Errors shown to the user as one line.

Every bad input (a file, a value, a configuration) raises :class:`InputError` with a
message that names the file or value and says what is wrong. The CLI prints it as
``error: <message>`` on stderr and exits with status 2.
"""


class InputError(ValueError):
    """A user-facing input problem: the message names the file or value and the fault.

    A :class:`ValueError`, so library code that catches bad values catches it too.
    """
