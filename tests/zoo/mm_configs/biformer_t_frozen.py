_base_ = ["./_base_/zoo_backbone.py"]
backbone = dict(arch="zoo_biformer_t", drop_path_rate=0.1, frozen_stages=1, norm_eval=True)
