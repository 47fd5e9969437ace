"""The one exception for mistakes a user can fix.

A UserError message says what is wrong, the value found, the value expected
and what to change. Command-line entry points catch it, print the message
and exit non-zero; library code only raises it.
"""


class UserError(Exception):
    """A problem with the user's input or settings, with what to do about it."""


def run_cli(main, argv=None) -> int:
    """Call main(argv); print a UserError as a clear message and return 2."""
    import sys

    try:
        rc = main(argv)
    except UserError as e:
        print(f"\nERROR: {e}\n", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr, flush=True)
        return 130
    return 0 if rc is None else int(rc)
