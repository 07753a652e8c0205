"""Train a semantic segmenter: `python train/seg.py --config configs/seg/zoo_biformer_t_digits.yaml`.

Everything it runs lives in `zoo.training`; `--help` lists the options, `--print_config` the resolved config.
"""

from zoo.training import SegmentationData, SemanticSegmentation
from zoo.training.cli import main

if __name__ == "__main__":
    main(SemanticSegmentation, SegmentationData)
