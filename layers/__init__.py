from layers.monarch import MonarchLinear, monarch_multiply, monarch_multiply_ref  # noqa: F401
