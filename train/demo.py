"""Launcher for the zoo demo: `python train/demo.py` (same as `python -m zoo.demo`)."""

from zoo.demo import main

if __name__ == "__main__":
    main()
