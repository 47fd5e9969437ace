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


OOM_MARKS = ("out of memory", "can't allocate memory", "cudaerrormemoryallocation", "cublas_status_alloc_failed",
             "cannot allocate memory")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e`, or an exception it was raised from, is an out-of-memory error: torch's
    OutOfMemoryError (CUDA), a RuntimeError saying "out of memory" (CUDA, DeepSpeed, NCCL) or that
    the CPU allocator "can't allocate memory", a MemoryError. Compiler and library wrappers keep
    the original as __cause__ / __context__, which is followed."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return True
        if isinstance(e, RuntimeError) and not isinstance(e, UserError):
            msg = str(e).lower()
            if any(m in msg for m in OOM_MARKS):
                return True
        e = e.__cause__ or e.__context__
    return False
