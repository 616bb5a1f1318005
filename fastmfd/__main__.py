import sys

from .tools.cli import main

# Worker processes re-import the main module under another name: only run
# the command when this module really is the program.
if __name__ == "__main__":
    status = main()
    # A KeyboardInterrupt that escaped an exec() of a string (dataclasses make their
    # methods so) stays noted by the interpreter as unhandled, though main() handled it,
    # and `python -m` then dies by SIGINT instead of exiting with the status (CPython's
    # pythonrun.c, run_eval_code_obj). An exec clears the note as it starts.
    exec("")
    sys.exit(status)
