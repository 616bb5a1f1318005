import sys

from .tools.cli import main

# Worker processes re-import the main module under another name: only run
# the command when this module really is the program.
if __name__ == "__main__":
    sys.exit(main())
