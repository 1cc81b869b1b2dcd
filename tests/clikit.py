"""Running the CLI in-process, and what every user error must look like."""
from click.testing import CliRunner

from cli import main


def cli(*args, **kw):
    """``cli.py ARGS`` in this process (stdout and stderr together in ``.output``)."""
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def user_error(r, *messages):
    """Exit code 1, one message naming the problem, no traceback: the error was handled (a
    ``SystemExit``), not an exception CliRunner caught for us."""
    assert r.exception is None or isinstance(r.exception, SystemExit), \
        f"unhandled {r.exception!r}\n{r.output}"
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output, r.output
    for m in messages:
        assert m in r.output, (m, r.output)
    return r


def succeeded(r):
    assert r.exception is None or isinstance(r.exception, SystemExit), \
        f"unhandled {r.exception!r}\n{r.output}"
    assert r.exit_code == 0, r.output
    return r
