"""The ops every fused-pointwise path implements, named once: the dispatch, the reference and the oneDNN path
export exactly these (a test checks each defines them all)."""

OPS = (
    "bn_pointwise_conv_bn_gelu",
    "conv_add",
    "conv_bn_gelu",
    "conv_gelu",
    "linear",
    "linear_add",
    "linear_gelu",
    "linear_mul",
    "linear_split",
    "pointwise_conv",
    "pointwise_conv_add",
)
