#!/usr/bin/env python3
"""Run the daemon from a checkout without installing it: `python training_daemon.py --help`."""

from daemon.cli import main

if __name__ == "__main__":
    main()
