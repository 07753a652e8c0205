# A base OpenMMLab config: the zoo backbone as a detector/segmentor would declare it.
custom_imports = dict(imports=["zoo.integrations.mmengine"], allow_failed_imports=False)
backbone = dict(
    type="ZooBackbone",
    arch="zoo_biformer_s",
    out_indices=(0, 1, 2, 3),
    drop_path_rate=0.3,
    frozen_stages=-1,
    norm_eval=False,
)
