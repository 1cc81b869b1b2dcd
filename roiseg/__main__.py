"""``python -m roiseg`` (and ``torchrun -m roiseg ...``): the command line of ``roiseg.cli``."""
from roiseg.cli import main

if __name__ == "__main__":
    main()
