from layers.monarch import MonarchLinear, monarch_multiply, monarch_multiply_ref  # noqa: F401
from layers.butterfly import (  # noqa: F401
    Butterfly, FlatBlockButterflyLinear, butterfly_multiply, butterfly_multiply_ref, dct, fft, hadamard, ifft,
)
from layers.mask import MaskConv, MaskLinear, bake_masks, weight_ratio  # noqa: F401
