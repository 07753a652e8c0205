"""Train an image classifier: `python train/cls.py --config configs/cls/zoo_biformer_t_digits.yaml`.

Everything it runs lives in `zoo.training`; `--help` lists the options, `--print_config` the resolved config.
"""

from zoo.training import ImageClassificationData, ImageClassifier
from zoo.training.cli import main

if __name__ == "__main__":
    main(ImageClassifier, ImageClassificationData)
