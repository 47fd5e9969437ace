"""Run a script and SIGKILL it at a chosen file-system moment (a test helper).

    python killpoint.py [--kill EVENT:GLOB:N] [--trace FILE] SCRIPT [ARGS...]

Events: `create` (a temporary file was just created, before anything is written
to it), `replace` (a complete temporary is about to be renamed onto its name),
`link` (a hard link is about to be made), `append` (a file is about to be opened
for appending: a log row). GLOB matches the file name of the temporary
(`create`) or of the destination (the others); the N-th match
kills the process with SIGKILL, as a power cut or the OOM killer would, with
no clean-up of any kind. --trace appends `EVENT NAME` lines for every event.
"""
import argparse
import builtins
import fnmatch
import os
import runpy
import signal
import sys
import tempfile


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kill", default="")
    p.add_argument("--trace", default="")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    kind, pattern, n = (a.kill.split(":") + ["", "", "0"])[:3] if a.kill else ("", "", "0")
    seen = [0]

    def event(name_kind, path):
        name = os.path.basename(str(path))
        if a.trace:
            with real_open(a.trace, "a") as f:
                f.write(f"{name_kind} {name}\n")
        if name_kind == kind and fnmatch.fnmatch(name, pattern):
            seen[0] += 1
            if seen[0] == int(n):
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    mkstemp, replace, link, real_open = tempfile.mkstemp, os.replace, os.link, builtins.open

    def mkstemp_hook(*args, **kw):
        fd, path = mkstemp(*args, **kw)
        event("create", path)
        return fd, path

    def replace_hook(src, dst, *args, **kw):
        event("replace", dst)
        return replace(src, dst, *args, **kw)

    def link_hook(src, dst, *args, **kw):
        event("link", dst)
        return link(src, dst, *args, **kw)

    def open_hook(file, mode="r", *args, **kw):
        if "a" in mode and isinstance(file, (str, os.PathLike)):
            event("append", file)
        return real_open(file, mode, *args, **kw)

    tempfile.mkstemp, os.replace, os.link = mkstemp_hook, replace_hook, link_hook
    builtins.open = open_hook
    sys.argv = [a.script, *a.args]
    runpy.run_path(a.script, run_name="__main__")


if __name__ == "__main__":
    main()
