import sys

from dfa_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())
