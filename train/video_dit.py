"""Train the zoo's video DiT: `python train/video_dit.py --config configs/video/video_dit_digits.yaml`.

Everything it runs lives in `zoo.training`; `--help` lists the options, `--print_config` the resolved config.
"""

from zoo.training import MovingDigitsData, VideoDiTTask
from zoo.training.cli import main

if __name__ == "__main__":
    main(VideoDiTTask, MovingDigitsData)
