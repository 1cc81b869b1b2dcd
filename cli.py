"""`uv run cli.py ...` (and `torchrun cli.py ...`): the command line of ``roiseg.cli``, run from a
checkout (an installed package has the `roiseg` command and `python -m roiseg`)."""
from roiseg.cli import main

if __name__ == "__main__":
    main()
